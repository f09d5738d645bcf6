"""The thin paquo layer: a QuPath project as :mod:`bridge.connectors.qupath.run` needs it.

Only these functions touch paquo (and, through it, QuPath's Java code); the
rest of the connector is plain Python tested without QuPath, with
``tests/support/qupath_memory.py`` standing in for this module.

* :func:`project_file` - ``project.qpproj`` or its folder, checked before paquo loads;
* :func:`open_project` - paquo's ``QuPathProject`` in mode ``"r"`` (dry run,
  export) or ``"r+"``;
* :class:`PaquoEntry` - an image entry: URI, ``server.json`` metadata,
  objects as GeoJSON (bulk, through QuPath's Gson), and one all-or-nothing
  write per image.

**How an image is written** (the order is :func:`bridge.connectors.qupath.run.write_image`'s):
``insert_objects`` converts every new Feature with one
``hierarchy.load_geojson(..., raise_on_skip=True)`` (one invalid Feature
raises before any is inserted) and inserts them with QuPath's
``insertPathObjects``; ``remove_objects`` removes our earlier nuclei,
detections or annotations, with one ``removeObjects`` call; ``save`` saves
that image alone (``entry.save()``, i.e. QuPath's ``saveImageData``, which
moves ``data.qpdata`` to ``data.qpdata.bkp``, writes a new one through
``PathIO`` and restores the backup only on an ``IOException``).  The core
guards ``data_file()`` around the save and, on any error, calls
``discard_changes``, which puts the hierarchy read back from disk
(``readHierarchy``) in place of the changed one (``setHierarchy``).  Nothing
else ever saves: the project is not used as a context manager (paquo's
``__exit__`` would save every changed image, also after an error).  paquo
starts the JVM with JPype's default, which lets Java kill the process on
Ctrl-C; we give SIGINT back to Python after start-up so that the core can hold
it during a save (see :func:`bridge.connectors.qupath.run.hold_interrupts`).
"""

from __future__ import annotations

import copy
import json
import signal
import threading
from pathlib import Path
from typing import Any

from bridge.errors import BridgeInputError

MIN_QUPATH = "0.4.0"  # GeoJSON object ids, which --replace needs


def project_file(path: str | Path) -> Path:
    """The ``project.qpproj`` of PROJECT (the file or its folder), or a clear error."""
    p = Path(path).expanduser()
    if p.is_dir():
        f = p / "project.qpproj"
        if not f.is_file():
            raise BridgeInputError(f"{p} is not a QuPath project: it has no project.qpproj")
    elif p.is_file():
        if p.suffix.lower() != ".qpproj":
            raise BridgeInputError(f"{p} is not a QuPath project: give project.qpproj or the project folder")
        f = p
    else:
        raise BridgeInputError(f"QuPath project not found: {p}")
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BridgeInputError(f"{f} is not a readable QuPath project file ({exc})") from exc
    if not isinstance(doc, dict) or ("images" not in doc and "version" not in doc):
        raise BridgeInputError(f"{f} is not a QuPath project file (no 'version' or 'images')")
    return f


def _give_sigint_back_to_python() -> None:
    """JPype (interrupt=True, paquo's default) routes Ctrl-C to the JVM, which
    halts the process; reinstall Python's handler so Ctrl-C is a KeyboardInterrupt."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _load_paquo() -> tuple[Any, Any]:
    """paquo's QuPathProject and QuPath's GsonTools; starts the JVM once."""
    try:
        import paquo  # noqa: F401  (cheap: no JVM yet)
    except ImportError as exc:
        raise BridgeInputError(
            "the qupath commands need paquo: pip install 'nuclick-bridge[qupath]' (and QuPath 0.6)"
        ) from exc
    try:
        from paquo._utils import QuPathVersion
        from paquo.java import GsonTools, qupath_version
        from paquo.projects import QuPathProject
    except Exception as exc:  # no QuPath found, wrong folder, JVM failed to start
        raise BridgeInputError(
            f"paquo could not start QuPath ({type(exc).__name__}: {exc}); set PAQUO_QUPATH_DIR to your"
            " QuPath 0.6 folder (the one containing lib/app and lib/runtime)"
        ) from exc
    _give_sigint_back_to_python()
    if qupath_version is not None and qupath_version < QuPathVersion(MIN_QUPATH):
        raise BridgeInputError(f"QuPath {qupath_version} is too old: nuclick-bridge needs QuPath >= {MIN_QUPATH}")
    return QuPathProject, GsonTools


class PaquoEntry:
    """One image entry (see :class:`bridge.connectors.qupath.run.QuPathEntry`)."""

    def __init__(self, entry: Any, gson_tools: Any) -> None:
        self._entry = entry
        self._gson = gson_tools
        self.name = str(entry.image_name)

    def image_uri(self) -> str:
        try:
            return str(self._entry.uri)
        except (RuntimeError, NotImplementedError) as exc:
            raise BridgeInputError(f"the entry has no single image file ({exc})") from exc

    def server_metadata(self) -> dict[str, Any]:
        path = Path(str(self._entry.entry_path)) / "server.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        return meta if isinstance(meta, dict) else {}

    def _geojson(self, java_objects: Any) -> list[dict]:
        text = str(self._gson.getInstance().toJson(java_objects))
        data = json.loads(text)
        return list(data) if isinstance(data, list) else []

    def read_objects(self) -> tuple[list[dict], list[dict]]:
        hierarchy = self._entry.hierarchy
        annotations = hierarchy.to_geojson()
        detections = self._geojson(hierarchy.java_object.getDetectionObjects())
        return annotations, detections

    def data_file(self) -> Path:
        return Path(str(self._entry.entry_path)) / "data.qpdata"

    def insert_objects(self, features: list[dict]) -> None:
        self._entry.hierarchy.load_geojson(copy.deepcopy(features), raise_on_skip=True)

    def remove_objects(self, ids: list[str]) -> None:
        hierarchy = self._entry.hierarchy
        wanted = set(ids)
        doomed = [o for o in hierarchy.java_object.getAllObjects(False) if str(o.getID()) in wanted]
        if len(doomed) != len(wanted):
            raise RuntimeError(f"found {len(doomed)} of the {len(wanted)} objects to remove")
        hierarchy.java_object.removeObjects(doomed, True)
        hierarchy.flush(invalidate_proxy_cache=True)

    def save(self) -> None:
        if not self._entry.is_readable():  # paquo's save() would skip such an image silently
            raise BridgeInputError(f"cannot save {self.name}: its image file is not reachable")
        self._entry.save()

    def discard_changes(self) -> None:
        hierarchy = self._entry.hierarchy
        hierarchy.java_object.setHierarchy(self._entry.java_object.readHierarchy())
        hierarchy.flush(invalidate_proxy_cache=True)


class PaquoProject:
    """An opened project (see :class:`bridge.connectors.qupath.run.QuPathProjectLike`)."""

    def __init__(self, project: Any, gson_tools: Any, path: Path) -> None:
        self._project = project
        self._gson = gson_tools
        self.path = path

    def entries(self) -> list[PaquoEntry]:
        return [PaquoEntry(e, self._gson) for e in self._project.images]


def open_project(path: str | Path, readonly: bool) -> PaquoProject:
    """Open PROJECT with paquo: mode ``"r"`` when ``readonly`` (nothing can be
    written), else ``"r+"``.  Nothing is saved unless an entry writes."""
    f = project_file(path)
    project_cls, gson_tools = _load_paquo()
    try:
        project = project_cls(f, mode="r" if readonly else "r+")
    except Exception as exc:  # Java IOException for old or corrupt projects, ...
        raise BridgeInputError(f"{f} could not be opened as a QuPath project ({type(exc).__name__}: {exc})") from exc
    return PaquoProject(project, gson_tools, f)
