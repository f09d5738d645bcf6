"""An in-memory QuPath project: the test double of :mod:`bridge.connectors.qupath.paquo`.

It implements the same small interface (:class:`~bridge.connectors.qupath.run.QuPathEntry`)
over plain GeoJSON dicts, standing in for exactly these paquo calls:

==========================  ====================================================
``MemoryEntry``              paquo (``QuPathProjectImageEntry`` of a ``QuPathProject``)
==========================  ====================================================
``name``                     ``entry.image_name``
``image_uri()``              ``entry.uri``
``server_metadata()``        ``entry.entry_path / "server.json"`` -> ``["metadata"]``
``read_objects()``           ``entry.hierarchy.to_geojson()`` (annotations) and
                             ``GsonTools.toJson(hierarchy.getDetectionObjects())``
``write_objects(add, ids)``  ``hierarchy.load_geojson(add, raise_on_skip=True)``,
                             ``hierarchy.removeObjects(<ours with those ids>)``,
                             ``entry.save()``
==========================  ====================================================

Like QuPath, it keeps only what QuPath stores of a Feature (id, geometry,
objectType, name, classification, measurements, string metadata; other
properties such as ``nuclick`` are dropped), gives every object an id, refuses
invalid input before changing anything, and counts saves.  ``fail_next_write``
makes the next write raise after validation, before anything is kept, which is
what an error inside paquo looks like from disk: that image is not saved.
"""

from __future__ import annotations

import copy
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shapely.geometry import shape

_KEPT = ("objectType", "name", "color", "classification", "isLocked")


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
    annotations: list[dict] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    saves: int = 0
    fail_next_write: BaseException | None = None
    during_write: Any = None  # callable run in the middle of a write (e.g. to send a signal)

    def __post_init__(self) -> None:
        self.annotations = [as_stored_by_qupath(f) for f in self.annotations]
        self.detections = [as_stored_by_qupath(f) for f in self.detections]

    def image_uri(self) -> str:
        return self.uri

    def server_metadata(self) -> dict[str, Any]:
        return copy.deepcopy(self.metadata)

    def read_objects(self) -> tuple[list[dict], list[dict]]:
        return copy.deepcopy(self.annotations), copy.deepcopy(self.detections)

    def write_objects(self, add: list[dict], remove_ids: list[str]) -> None:
        stored = [as_stored_by_qupath(f) for f in add]  # every object converted before any change
        wanted = set(remove_ids)
        present = {d["id"] for d in self.detections}
        if wanted - present:
            raise KeyError(f"no detections with ids {sorted(wanted - present)}")
        if self.during_write is not None:
            self.during_write()
        if self.fail_next_write is not None:
            exc, self.fail_next_write = self.fail_next_write, None
            raise exc
        self.detections = [d for d in self.detections if d["id"] not in wanted] + stored
        self.saves += 1


@dataclass
class MemoryProject:
    path: Path
    images: list[MemoryEntry] = field(default_factory=list)

    def entries(self) -> list[MemoryEntry]:
        return list(self.images)
