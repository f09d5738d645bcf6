"""QuPath-importable GeoJSON output, written atomically.

Why this shape: QuPath (>= 0.4) imports a FeatureCollection whose features
carry ``objectType`` ("detection" or "annotation"), an optional
``classification`` ``{"name", "color": [r, g, b]}`` and ``measurements`` as a
name -> number object; coordinates are level-0 pixels, the same frame as the
clicks (see :mod:`bridge.io.coords`), so the polygons land on the nuclei as-is.
Not-found clicks are not features; the caller reports them separately.
"""

from __future__ import annotations

import colorsys
import contextlib
import hashlib
import json
import math
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from shapely.geometry import mapping

from bridge.results import NucleusResult

OBJECT_TYPES = ("detection", "annotation")

# QuPath's built-in class colours, so familiar classes look familiar.
QUPATH_CLASS_COLORS: dict[str, list[int]] = {
    "Tumor": [200, 0, 0],
    "Stroma": [150, 200, 150],
    "Immune cells": [160, 90, 160],
    "Necrosis": [50, 50, 50],
    "Other": [255, 200, 0],
}


def class_color(name: str) -> list[int]:
    """A stable ``[r, g, b]`` for a class name (same name, same colour, every run).

    QuPath's defaults for its built-in classes; otherwise a bright colour from
    an MD5 of the name (Python's ``hash`` is salted per process, so unusable).
    """
    if name in QUPATH_CLASS_COLORS:
        return list(QUPATH_CLASS_COLORS[name])
    digest = hashlib.md5(name.encode("utf-8"), usedforsecurity=False).digest()
    hue = int.from_bytes(digest[:4], "big") / 2**32
    sat = 0.55 + 0.4 * digest[4] / 255
    val = 0.75 + 0.2 * digest[5] / 255
    return [round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)]


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively, so the geometry is plain JSON data."""
    if isinstance(obj, (list, tuple)):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if hasattr(obj, "item") and not isinstance(obj, (int, float)):  # numpy scalar
        return obj.item()
    return obj


def _measurements(result: NucleusResult) -> dict[str, float]:
    area = float(result.area_px) if result.area_px else float(result.polygon.area)  # type: ignore[union-attr]
    values = {"Area px^2": area, "NuClick probability": float(result.score)}
    # NaN/inf are not JSON; QuPath shows a missing measurement as NaN anyway.
    return {k: v for k, v in values.items() if math.isfinite(v)}


def result_to_feature(result: NucleusResult, object_type: str = "detection") -> dict[str, Any]:
    """One QuPath Feature for a found nucleus."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, not {object_type!r}")
    if not result.found or result.polygon is None or result.polygon.is_empty:
        raise ValueError(f"click {result.click.id!r} has no polygon to write")
    click = result.click
    properties: dict[str, Any] = {"objectType": object_type}
    if click.class_name:
        properties["classification"] = {"name": click.class_name, "color": class_color(click.class_name)}
    properties["measurements"] = _measurements(result)
    properties["nuclick"] = {"click_id": click.id, "click_x": float(click.x), "click_y": float(click.y)}
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": _plain(mapping(result.polygon)),
        "properties": properties,
    }


def results_to_feature_collection(results: Iterable[NucleusResult], object_type: str = "detection") -> dict[str, Any]:
    """A FeatureCollection with one Feature per found nucleus (not-found clicks omitted)."""
    features = [result_to_feature(r, object_type) for r in results if r.found]
    return {"type": "FeatureCollection", "features": features}


def _umask() -> int:
    """The process umask without changing it (``os.umask`` would race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def check_writable(path: str | Path, flag: str = "--out") -> None:
    """Fail in one line, before any work, when :func:`atomic_write_bytes` could
    not write ``path``: a folder given as the file, a missing folder, or a
    place this process cannot create files in (probed with a real temp file,
    as the write itself will need one; permission bits alone mislead root)."""
    from bridge.errors import BridgeInputError

    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise BridgeInputError(f"{flag} {path} is a folder; give a file name, such as {path / 'nuclei.geojson'}")
    if not directory.is_dir():
        raise BridgeInputError(f"output folder does not exist: {directory}")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise BridgeInputError(f"cannot write {flag} {path}: {exc.strerror or exc} in {directory}") from None


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` only when the block ends without an
    error: readers see the old file or the new one, never half.

    Temp file in the same directory (same filesystem), fsync, then
    ``os.replace``; on any failure the temp file is removed and the target is
    untouched.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes 0600; give the file the mode a plain open() would have.
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    # Persist the rename itself (best effort: not every platform can fsync a directory).
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write_bytes` for text."""
    atomic_write_bytes(path, text.encode(encoding))


class GeoJsonSpool:
    """A FeatureCollection written as results arrive, in any order, and laid
    out in click order when committed: what :func:`write_geojson` writes, but
    holding no nucleus in memory.

    Why: a whole slide can carry tens of thousands of clicks, and results come
    back tile by tile.  Each feature is serialised at once into an unlinked
    spool file beside ``path``; only its offset is kept (16 bytes a click).
    :meth:`commit` copies the features, in click order, into ``path``
    atomically; until then ``path`` is untouched.
    """

    def __init__(self, path: str | Path, n_clicks: int, object_type: str = "detection") -> None:
        import numpy as np

        if object_type not in OBJECT_TYPES:
            raise ValueError(f"object_type must be one of {OBJECT_TYPES}, not {object_type!r}")
        self.path = Path(path)
        self.object_type = object_type
        directory = self.path.parent if str(self.path.parent) else Path(".")
        spool = tempfile.TemporaryFile(dir=directory, prefix=f".{self.path.name}.", suffix=".spool")  # noqa: SIM115
        self._spool = spool  # closed by commit() or close()
        self._offset = np.full(n_clicks, -1, dtype=np.int64)
        self._length = np.zeros(n_clicks, dtype=np.int64)
        self.count = 0

    def add(self, k: int, result: NucleusResult) -> bool:
        """Spool click ``k``'s nucleus; False (nothing written) when it was not found."""
        if not result.found:
            return False
        if self._offset[k] >= 0:
            raise ValueError(f"click {k} was written twice")
        data = json.dumps(result_to_feature(result, self.object_type), allow_nan=False).encode("utf-8")
        self._offset[k] = self._spool.seek(0, os.SEEK_END)
        self._length[k] = len(data)
        self._spool.write(data)
        self.count += 1
        return True

    def commit(self) -> int:
        """Write ``path`` (atomically, features in click order); the feature count."""
        import numpy as np

        with atomic_writer(self.path) as fh:
            fh.write(b'{"type": "FeatureCollection", "features": [')
            for n, k in enumerate(np.flatnonzero(self._offset >= 0)):
                if n:
                    fh.write(b", ")
                self._spool.seek(int(self._offset[k]))
                fh.write(self._spool.read(int(self._length[k])))
            fh.write(b"]}\n")
        self.close()
        return self.count

    def close(self) -> None:
        self._spool.close()

    def __enter__(self) -> GeoJsonSpool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_geojson(
    path: str | Path,
    results: Iterable[NucleusResult],
    object_type: str = "detection",
    indent: int | None = None,
) -> int:
    """Write found nuclei as a QuPath-importable FeatureCollection; returns the feature count."""
    if indent is None:  # streamed: one feature in memory at a time
        results = results if isinstance(results, Sequence) else list(results)
        with GeoJsonSpool(path, len(results), object_type) as spool:
            for k, r in enumerate(results):
                spool.add(k, r)
            return spool.commit()
    collection = results_to_feature_collection(results, object_type)
    text = json.dumps(collection, indent=indent, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return len(collection["features"])
