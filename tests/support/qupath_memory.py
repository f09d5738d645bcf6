"""A QuPath project for the tests: the test double of :mod:`bridge.connectors.qupath.paquo`.

It implements the same small interface (:class:`~bridge.connectors.qupath.run.QuPathEntry`)
over plain GeoJSON dicts, and keeps each image on disk the way a QuPath
project does (``project.qpproj``, ``data/<id>/server.json`` and
``data/<id>/data.qpdata``; the data file holds JSON here, Java serialization
in QuPath), so a test can re-open the project and see what really reached the
disk.  It stands in for exactly these paquo / QuPath calls:

============================  ==================================================
``MemoryEntry``                paquo (``QuPathProjectImageEntry`` of a ``QuPathProject``)
============================  ==================================================
``name``                       ``entry.image_name``
``image_uri()``                ``entry.uri``
``server_metadata()``          ``entry.entry_path / "server.json"`` -> ``["metadata"]``
``read_objects()``             ``entry.hierarchy.to_geojson()`` (annotations) and
                               ``GsonTools.toJson(hierarchy.getDetectionObjects())``
``data_file()``                ``entry.entry_path / "data.qpdata"``
``insert_objects(features)``   ``hierarchy.load_geojson(features, raise_on_skip=True)``
``remove_objects(ids)``        ``hierarchy.removeObjects(<objects with those ids>, True)``
``save()``                     ``entry.save()`` -> ``DefaultProjectImageEntry.saveImageData``
``discard_changes()``          ``hierarchy.setHierarchy(entry.readHierarchy())``
============================  ==================================================

Like QuPath 0.6 it keeps only what QuPath stores of a Feature (id, geometry,
objectType, name, colour, classification, measurements, and string metadata
on every object type; other properties such as ``nuclick`` are dropped), gives
every object an id, and converts every Feature before inserting any.

It fails where QuPath fails:

* ``fail_after_inserting=n``: the next insert raises after ``n`` objects went
  into the hierarchy (an exception inside ``insertPathObjects``); they stay in
  memory, as in QuPath.
* ``fail_in_save=exc``: the next save raises ``exc`` halfway through writing
  ``data.qpdata``, after QuPath's sequence: move ``data.qpdata`` to
  ``data.qpdata.bkp``, write a new ``data.qpdata``, delete the backup; on an
  ``OSError`` (Java's ``IOException``) the backup is moved back, on any other
  exception the half-written file and the backup are left, as QuPath leaves them.
* ``fail_after_data=exc``: the next save raises ``exc`` after ``data.qpdata``
  is complete and the backup deleted (writing ``summary.json`` failed).
"""

from __future__ import annotations

import copy
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shapely.geometry import shape

_KEPT = ("objectType", "name", "color", "classification")
DATA_FILE = "data.qpdata"


class JavaException(RuntimeError):
    """What a Java exception raised inside QuPath looks like through JPype: not an OSError."""


def as_stored_by_qupath(feature: dict[str, Any]) -> dict[str, Any]:
    """A Feature as QuPath keeps it after ``load_geojson`` and writes it back."""
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise ValueError("not a GeoJSON Feature")
    geometry = feature.get("geometry")
    if shape(geometry).is_empty:  # raises on malformed geometry, as Gson does
        raise ValueError("empty geometry")
    props = feature.get("properties") or {}
    out_props = {k: copy.deepcopy(props[k]) for k in _KEPT if k in props}
    out_props.setdefault("objectType", "annotation")
    if props.get("isLocked") is True:  # QuPath writes isLocked only when true
        out_props["isLocked"] = True
    measurements = props.get("measurements")
    if isinstance(measurements, dict) and measurements:
        out_props["measurements"] = {k: float(v) for k, v in measurements.items() if math.isfinite(float(v))}
    metadata = props.get("metadata")
    if isinstance(metadata, dict) and metadata:
        out_props["metadata"] = {k: str(v) for k, v in metadata.items() if isinstance(v, (str, int, float))}
    raw_id = feature.get("id")
    try:
        object_id = str(uuid.UUID(str(raw_id)))
    except ValueError:
        object_id = str(uuid.uuid4())
    return {"type": "Feature", "id": object_id, "geometry": copy.deepcopy(geometry), "properties": out_props}


@dataclass
class MemoryEntry:
    name: str
    uri: str
    annotations: list[dict] = field(default_factory=list)  # the hierarchy in memory
    detections: list[dict] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    fail_after_inserting: int | None = None
    fail_in_save: BaseException | None = None
    fail_after_data: BaseException | None = None
    during_write: Any = None  # callable run at the start of every save (e.g. to send a signal)
    saves: int = 0  # completed saves
    entry_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    folder: Path | None = None  # data/<entry_id> of the project, once attached

    def __post_init__(self) -> None:
        self.annotations = [as_stored_by_qupath(f) for f in self.annotations]
        self.detections = [as_stored_by_qupath(f) for f in self.detections]

    # -- the project's files

    def attach(self, folder: Path) -> None:
        """Put the entry on disk, as QuPath has it once the user saved their points."""
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "server.json").write_text(json.dumps({"metadata": self.metadata}), encoding="utf-8")
        (folder / DATA_FILE).write_bytes(self._payload())

    def _payload(self) -> bytes:
        return json.dumps({"annotations": self.annotations, "detections": self.detections}).encode("utf-8")

    def _load(self) -> None:
        path = self.data_file()
        if path is None or not path.exists():  # readHierarchy(): an empty hierarchy
            self.annotations, self.detections = [], []
            return
        data = json.loads(path.read_bytes())  # a half-written file raises, as PathIO does
        self.annotations, self.detections = data["annotations"], data["detections"]

    # -- the interface

    def image_uri(self) -> str:
        return self.uri

    def server_metadata(self) -> dict[str, Any]:
        return copy.deepcopy(self.metadata)

    def read_objects(self) -> tuple[list[dict], list[dict]]:
        return copy.deepcopy(self.annotations), copy.deepcopy(self.detections)

    def data_file(self) -> Path | None:
        return None if self.folder is None else self.folder / DATA_FILE

    def insert_objects(self, features: list[dict]) -> None:
        stored = [as_stored_by_qupath(f) for f in features]  # every Feature converted before any goes in
        stop, self.fail_after_inserting = self.fail_after_inserting, None
        for k, feature in enumerate(stored):
            if stop is not None and k == stop:
                raise JavaException(f"java.lang.IllegalStateException: failed after inserting {k} objects")
            kind = feature["properties"]["objectType"]
            (self.detections if kind != "annotation" else self.annotations).append(feature)

    def remove_objects(self, ids: list[str]) -> None:
        wanted = set(ids)
        present = {f["id"] for f in (*self.annotations, *self.detections)}
        if wanted - present:
            raise RuntimeError(f"found {len(wanted & present)} of the {len(wanted)} objects to remove")
        self.annotations = [f for f in self.annotations if f["id"] not in wanted]
        self.detections = [f for f in self.detections if f["id"] not in wanted]

    def save(self) -> None:
        if self.during_write is not None:
            self.during_write()
        data = self.data_file()
        if data is None:
            raise RuntimeError(f"{self.name} is not part of a project on disk")
        backup = data.with_name(DATA_FILE + ".bkp")
        if data.exists():
            os.replace(data, backup)
        payload = self._payload()
        failure, self.fail_in_save = self.fail_in_save, None
        try:
            with open(data, "wb") as f:
                if failure is not None:
                    f.write(payload[: len(payload) // 2])
                    raise failure
                f.write(payload)
            backup.unlink(missing_ok=True)
        except OSError:  # Java's IOException: QuPath moves its backup back (and fails if there is none)
            os.replace(backup, data)
            raise
        later, self.fail_after_data = self.fail_after_data, None
        if later is not None:
            raise later
        self.saves += 1

    def discard_changes(self) -> None:
        self._load()


@dataclass
class MemoryProject:
    path: Path
    images: list[MemoryEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        for entry in self.images:
            if entry.folder is None:
                entry.attach(self.path / "data" / entry.entry_id)
        listing = [
            {"entryID": e.entry_id, "imageName": e.name, "uri": e.uri, "folder": str(e.folder)} for e in self.images
        ]
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "project.qpproj").write_text(json.dumps({"version": "0.6.0", "images": listing}), encoding="utf-8")

    def entries(self) -> list[MemoryEntry]:
        return list(self.images)

    @classmethod
    def reopen(cls, path: Path) -> MemoryProject:
        """The project as a fresh process would open it: only what is on disk."""
        doc = json.loads((Path(path) / "project.qpproj").read_text(encoding="utf-8"))
        entries = []
        for item in doc["images"]:
            folder = Path(item["folder"])
            server = json.loads((folder / "server.json").read_text(encoding="utf-8"))
            entry = MemoryEntry(
                item["imageName"], item["uri"], metadata=server["metadata"], entry_id=item["entryID"], folder=folder
            )
            entry.discard_changes()
            entries.append(entry)
        return cls(path, entries)
