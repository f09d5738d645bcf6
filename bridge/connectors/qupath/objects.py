"""QuPath objects as GeoJSON dicts: points in, nucleus detections out.

Everything here is plain data (no paquo, no Java): paquo hands us each image's
objects as QuPath GeoJSON Features, and takes new objects back the same way,
so this module is tested with real files and no QuPath.

QuPath GeoJSON (>= 0.4), as QuPath writes and reads it::

    {"type": "Feature", "id": "<uuid>", "geometry": {...},
     "properties": {"objectType": "annotation" | "detection" | ...,
                    "name": "...", "classification": {"name": "Tumor", "color": [r, g, b]},
                    "measurements": {"Area px^2": 123.0, ...},
                    "metadata": {"key": "string value", ...}}}

Coordinates are level-0 pixels in QuPath's continuous convention (see
:mod:`bridge.io.coords`), so points and polygons go through unchanged.

**The marker.**  Every nucleus we write is named
``nuclick-bridge <run id> @<x>,<y>``, the click's coordinates with three
decimals.  QuPath always keeps an object's name (it is shown in the
hierarchy and the measurement table), so the name alone finds our nuclei
again, whether they are detections (this connector) or annotations (the
QuPath extension can make either).  QuPath 0.6 keeps string metadata on every
object (``PathObject.getMetadata()``; GeoJSON ``properties.metadata``), and
there our nuclei also carry ``nuclick_run``, ``nuclick_point`` (the point's
key) and ``nuclick_point_id``: the object id (UUID) of the point annotation
the click came from.  A later run recognises "this point already has a
nucleus" by the coordinates in the name, whatever the run or object type;
objects without such a name are never ours and are never touched.

**Orphans.**  One of our nuclei is an orphan iff it records a point id and
the image no longer has a point at its key inside a point annotation with
that id (the annotation is gone, or no longer holds that point).  Nuclei
without a point id (older runs, or nuclei the extension *released* when it
removed their points on purpose) are never orphans.  ``--replace`` removes
orphans; see :func:`bridge.connectors.qupath.run.plan_points`.
"""

from __future__ import annotations

import math
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import unquote, urlsplit

from bridge.errors import BridgeInputError
from bridge.io.geojson import result_to_feature
from bridge.io.points import class_name_of
from bridge.results import Click, NucleusResult

MARKER_PREFIX = "nuclick-bridge"
_MARKER_RE = re.compile(r"^nuclick-bridge (?P<run>[A-Za-z0-9_.:-]+) @(?P<x>-?\d+\.\d+),(?P<y>-?\d+\.\d+)$")
AREA_PX = "Area px^2"
AREA_UM = "Area µm^2"
PROBABILITY = "NuClick probability"
_MICROMETRE_UNITS = {"µm", "μm", "um", "micron", "microns", "micrometer", "micrometre"}


# ------------------------------------------------------------------ markers


def new_run_id() -> str:
    """A short, sortable, unique-enough id for one run: ``YYYYmmdd-HHMMSS-xxxx``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def point_key(x: float, y: float) -> str:
    """The source point's identity across runs: its coordinates to 1/1000 px."""
    return f"{x:.3f},{y:.3f}"


@dataclass(frozen=True)
class Marker:
    """What a detection's name tells: which run wrote it, for which point."""

    run_id: str
    key: str  # point_key of the source point

    @property
    def name(self) -> str:
        return f"{MARKER_PREFIX} {self.run_id} @{self.key}"


def marker_for(run_id: str, click: Click) -> Marker:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", run_id):
        raise ValueError(f"run id {run_id!r} may only contain letters, digits and _.:-")
    return Marker(run_id, point_key(click.x, click.y))


def parse_marker(name: Any) -> Marker | None:
    """The marker in an object's name, or None for objects that are not ours."""
    if not isinstance(name, str):
        return None
    m = _MARKER_RE.match(name)
    if m is None:
        return None
    return Marker(m["run"], f"{m['x']},{m['y']}")


# ------------------------------------------------------------------- points


def _point_list(geometry: Any) -> list[Any]:
    if not isinstance(geometry, dict):
        return []
    kind = geometry.get("type")
    if kind == "Point":
        return [geometry.get("coordinates")]
    if kind == "MultiPoint":
        coords = geometry.get("coordinates")
        return list(coords) if isinstance(coords, list) else []
    return []


@dataclass
class PointExtraction:
    """The clicks of one image, and what was left out and why."""

    clicks: list[Click]
    by_class: Counter = field(default_factory=Counter)  # class name ("Unclassified") -> clicks kept
    other_classes: int = 0  # points left out by the class filter
    problems: list[str] = field(default_factory=list)  # points that cannot be used, one line each


def class_label(name: str | None) -> str:
    return name if name else "Unclassified"


def extract_points(features: Iterable[dict], classes: Sequence[str] = ()) -> PointExtraction:
    """One click per point of every Point / MultiPoint annotation.

    QuPath's Points tool stores one multi-point annotation per class; every
    point inherits its annotation's class.  ``classes`` (if given) keeps only
    points of those classes (``Unclassified`` selects points without one).
    A click's id is ``<annotation id>:<k>`` (k from 1 within the annotation).
    Points at the same coordinates as an earlier point are used once.
    """
    wanted = set(classes)
    out = PointExtraction(clicks=[])
    seen: dict[str, str] = {}
    for number, feature in enumerate(features, start=1):
        if not isinstance(feature, dict):
            continue
        props = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
        if props.get("objectType", "annotation") != "annotation":
            continue
        points = _point_list(feature.get("geometry"))
        if not points:
            continue
        raw_id = feature.get("id")
        ann_id = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else f"#{number}"
        cls = class_name_of(props)
        if wanted and class_label(cls) not in wanted:
            out.other_classes += len(points)
            continue
        for k, coords in enumerate(points, start=1):
            click_id = f"{ann_id}:{k}"
            try:
                x, y = float(coords[0]), float(coords[1])
            except (TypeError, ValueError, IndexError):
                out.problems.append(f"point {click_id}: coordinates {coords!r} are not [x, y]")
                continue
            if not (math.isfinite(x) and math.isfinite(y)):
                out.problems.append(f"point {click_id}: coordinates ({x}, {y}) are not finite")
                continue
            key = point_key(x, y)
            if key in seen:
                out.problems.append(f"point {click_id} at ({key}) repeats point {seen[key]}; used once")
                continue
            seen[key] = click_id
            out.clicks.append(Click(x=x, y=y, id=click_id, class_name=cls))
            out.by_class[class_label(cls)] += 1
    return out


# --------------------------------------------------------------- our nuclei


def annotation_id_of(click_id: str) -> str | None:
    """The point annotation's QuPath id (a UUID) in a click id ``<id>:<k>``
    (or in a bare id, as the extension records it); None when the annotation
    had no id (QuPath < 0.4), which records no point id at all."""
    if not isinstance(click_id, str) or not click_id:
        return None
    for candidate in (click_id, click_id.rsplit(":", 1)[0]):
        try:
            return str(uuid.UUID(candidate))
        except ValueError:
            continue
    return None


def point_index(features: Iterable[dict]) -> set[tuple[str, str]]:
    """Every (point annotation id, point key) of the image, whatever its class:
    what the orphan rule looks up."""
    out: set[tuple[str, str]] = set()
    for feature in features:
        if not isinstance(feature, dict):
            continue
        props = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
        if props.get("objectType", "annotation") != "annotation":
            continue
        ann_id = annotation_id_of(str(feature.get("id", "")))
        if ann_id is None:
            continue
        for coords in _point_list(feature.get("geometry")):
            try:
                x, y = float(coords[0]), float(coords[1])
            except (TypeError, ValueError, IndexError):
                continue
            if math.isfinite(x) and math.isfinite(y):
                out.add((ann_id, point_key(x, y)))
    return out


@dataclass(frozen=True)
class OurNucleus:
    """A nucleus that a run of ours (connector or extension) wrote, found by its marker."""

    id: str | None
    marker: Marker
    class_name: str | None
    point_id: str | None = None  # the source point annotation's id; None: never an orphan
    object_type: str = "detection"  # or "annotation" (the extension can make those)

    def is_orphan(self, points: set[tuple[str, str]]) -> bool:
        """The orphan rule (module docstring): ``points`` from :func:`point_index`."""
        return self.point_id is not None and (self.point_id, self.marker.key) not in points


def our_nuclei(features: Iterable[dict]) -> list[OurNucleus]:
    """The detections and annotations carrying our marker; everything else is the user's."""
    out = []
    for feature in features:
        if not isinstance(feature, dict):
            continue
        props = feature.get("properties")
        if not isinstance(props, dict):
            continue
        kind = props.get("objectType", "annotation")
        if kind not in ("detection", "annotation") or _point_list(feature.get("geometry")):
            continue  # a point annotation is a click, never a nucleus
        marker = parse_marker(props.get("name"))
        if marker is None:
            continue
        meta = props.get("metadata") if isinstance(props.get("metadata"), dict) else {}
        point_id = annotation_id_of(str(meta.get("nuclick_point_id") or ""))
        raw_id = feature.get("id")
        out.append(
            OurNucleus(str(raw_id) if raw_id is not None else None, marker, class_name_of(props), point_id, kind)
        )
    return out


# -------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    pixel_width_um: float
    pixel_height_um: float

    def area_um2(self, area_px: float) -> float:
        return area_px * self.pixel_width_um * self.pixel_height_um


def _length_um(quantity: Any) -> float | None:
    if not isinstance(quantity, dict):
        return None
    value, unit = quantity.get("value"), quantity.get("unit")
    if not isinstance(unit, str) or unit.strip().lower() not in _MICROMETRE_UNITS:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


def calibration_from_metadata(metadata: Any) -> Calibration | None:
    """Pixel size in µm from QuPath's image metadata, or None if uncalibrated.

    ``metadata`` is the ``"metadata"`` object of an entry's ``server.json``:
    ``{"pixelCalibration": {"pixelWidth": {"value": 0.25, "unit": "µm"},
    "pixelHeight": {...}}}``; an uncalibrated image has unit ``px``.
    """
    if not isinstance(metadata, dict):
        return None
    cal = metadata.get("pixelCalibration")
    if not isinstance(cal, dict):
        return None
    w, h = _length_um(cal.get("pixelWidth")), _length_um(cal.get("pixelHeight"))
    if w is None or h is None:
        return None
    return Calibration(w, h)


def size_from_metadata(metadata: Any) -> tuple[int, int] | None:
    """(width, height) that QuPath recorded for the image, if known."""
    if not isinstance(metadata, dict):
        return None
    w, h = metadata.get("width"), metadata.get("height")
    if isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool) and w > 0 and h > 0:
        return w, h
    return None


# ---------------------------------------------------------------------- URI


def uri_to_path(uri: str) -> Path:
    """A QuPath image URI (``file:/...``) as a local path.

    Java writes ``file:/home/a%20b/x.svs``; ``file:///``, Windows drives
    (``file:/C:/x.svs``) and shares (``file://server/share/x.svs``) work too.
    Any other scheme (OMERO, http, ...) is not a local file and is refused.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise BridgeInputError("the image entry has no URI")
    parts = urlsplit(uri.strip())
    if parts.scheme.lower() != "file":
        raise BridgeInputError(
            f"image URI {uri} is not a local file ({parts.scheme or 'no'} scheme); only file: URIs can be read"
        )
    path = unquote(parts.path)
    host = parts.netloc if parts.netloc.lower() not in ("", "localhost") else ""
    if host:
        return Path(str(PureWindowsPath(f"//{host}{path}")))
    if re.match(r"^/[A-Za-z]:/", path):
        return Path(str(PureWindowsPath(path[1:])))
    return Path(str(PurePosixPath(path)))


# --------------------------------------------------------------- detections


def detection_feature(result: NucleusResult, run_id: str, calibration: Calibration | None = None) -> dict[str, Any]:
    """One QuPath detection for a found nucleus: the ``segment`` feature
    (polygon, class with colour, ``Area px^2``, ``NuClick probability``) plus
    ``Area µm^2`` when calibrated, and the marker: the name, and the metadata
    ``nuclick_run``, ``nuclick_point`` and ``nuclick_point_id`` (the point
    annotation's UUID, from the click id ``<uuid>:<k>``)."""
    feature = result_to_feature(result, "detection")
    click = result.click
    marker = marker_for(run_id, click)
    props = feature["properties"]
    props["name"] = marker.name
    measurements = props["measurements"]
    if calibration is not None and AREA_PX in measurements:
        area = calibration.area_um2(measurements[AREA_PX])
        if math.isfinite(area):
            measurements[AREA_UM] = area
    props["metadata"] = {"nuclick_run": run_id, "nuclick_point": marker.key}
    point_id = annotation_id_of(click.id)
    if point_id is not None:  # a point without a QuPath id records none: never an orphan
        props["metadata"]["nuclick_point_id"] = point_id
    return feature


def detection_features(
    results: Iterable[NucleusResult], run_id: str, calibration: Calibration | None = None
) -> list[dict[str, Any]]:
    """Detections for every found nucleus (not-found clicks are reported, not written)."""
    return [detection_feature(r, run_id, calibration) for r in results if r.found]


# ------------------------------------------------------------------- export


def export_collection(objects: Iterable[dict], run_id: str | None = None) -> dict[str, Any]:
    """Our nuclei of one image (detections, and the extension's annotations) as
    a FeatureCollection in the format ``nuclick-bridge segment`` writes (plus
    each object's name), for users who move objects between tools by file.
    ``run_id`` keeps one run only."""
    features = []
    for feature in objects:
        props = feature.get("properties") if isinstance(feature, dict) else None
        if not isinstance(props, dict) or not our_nuclei([feature]):
            continue
        marker = parse_marker(props.get("name"))
        if marker is None or (run_id is not None and marker.run_id != run_id):
            continue
        meta = props.get("metadata") if isinstance(props.get("metadata"), dict) else {}
        x, y = (float(v) for v in marker.key.split(","))
        out_props: dict[str, Any] = {"objectType": props.get("objectType", "annotation"), "name": marker.name}
        if isinstance(props.get("classification"), dict):
            out_props["classification"] = props["classification"]
        measurements = props.get("measurements")
        if isinstance(measurements, dict):
            out_props["measurements"] = {
                k: float(v) for k, v in measurements.items() if isinstance(v, (int, float)) and math.isfinite(v)
            }
        out_props["nuclick"] = {
            "click_id": str(meta.get("nuclick_point_id", "")),
            "click_x": x,
            "click_y": y,
            "run_id": marker.run_id,
        }
        out: dict[str, Any] = {"type": "Feature"}
        if feature.get("id") is not None:
            out["id"] = str(feature["id"])
        out["geometry"] = feature.get("geometry")
        out["properties"] = out_props
        features.append(out)
    return {"type": "FeatureCollection", "features": features}
