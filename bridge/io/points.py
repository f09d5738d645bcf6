"""Reading the user's clicks (one point per nucleus) from CSV or QuPath GeoJSON.

Why so strict: a click file is hand-made or exported from QuPath, and a
silently skipped row means a silently missing nucleus.  Every problem is a
:class:`~bridge.errors.BridgeInputError` naming the file and the row or
feature, so the user can fix it.  Coordinates are continuous level-0 pixels
(see :mod:`bridge.io.coords`), exactly as QuPath exports them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bridge.errors import BridgeInputError
from bridge.results import Click

log = logging.getLogger(__name__)

CSV_SUFFIXES = (".csv", ".tsv", ".txt")
JSON_SUFFIXES = (".geojson", ".json")


def read_points(path: str | Path) -> list[Click]:
    """Clicks from a ``.csv`` or a QuPath ``.geojson``/``.json`` export."""
    path = Path(path)
    if not path.exists():
        raise BridgeInputError(f"points file not found: {path}")
    if not path.is_file():
        raise BridgeInputError(f"points path is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return _read_csv(path)
    if suffix in JSON_SUFFIXES:
        return _read_geojson(path)
    raise BridgeInputError(
        f"{path.name}: unsupported points file type {path.suffix or '(no suffix)'};"
        " use .csv (columns x,y[,class]) or a QuPath .geojson export"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BridgeInputError(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise BridgeInputError(f"cannot read {path.name} ({exc.strerror or exc})") from exc


def _coordinate(value: Any, axis: str, where: str) -> float:
    """A finite float, or a one-line error naming ``where``."""
    if isinstance(value, bool) or value is None:
        raise BridgeInputError(f"{where}: {axis}={value!r} is not a number")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise BridgeInputError(f"{where}: {axis} is empty")
        try:
            number = float(text)
        except ValueError:
            raise BridgeInputError(f"{where}: {axis}={text!r} is not a number") from None
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise BridgeInputError(f"{where}: {axis}={value!r} is not a number")
    if not math.isfinite(number):
        raise BridgeInputError(f"{where}: {axis}={number} is not a finite coordinate")
    return number


# --------------------------------------------------------------------------- CSV


def _cell(row: list[str], col: dict[str, int], key: str) -> str:
    """The stripped cell of column ``key`` ("" when the column or the cell is absent)."""
    i = col.get(key)
    return row[i].strip() if i is not None and i < len(row) else ""


def _read_csv(path: Path) -> list[Click]:
    """CSV with a header containing ``x`` and ``y`` (optional ``class``, ``id``)."""
    name = path.name
    text = _read_text(path)
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None:
        raise BridgeInputError(f"{name} is empty: no clicks")
    # Comma by default; accept tab/semicolon files (e.g. spreadsheet exports).
    delimiter = ","
    if "," not in first:
        if "\t" in first:
            delimiter = "\t"
        elif ";" in first:
            delimiter = ";"

    reader = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    header_row = 0
    clicks: list[Click] = []
    seen_ids: dict[str, int] = {}
    col: dict[str, int] = {}
    for row_no, row in enumerate(reader, start=1):
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip().lower() for cell in row]
            header_row = row_no
            missing = [c for c in ("x", "y") if c not in header]
            if missing:
                raise BridgeInputError(
                    f"{name} row {row_no}: header {','.join(row)!r} has no {' or '.join(missing)} column;"
                    " expected a header like x,y or x,y,class"
                )
            col = {c: header.index(c) for c in ("x", "y", "class", "id") if c in header}
            continue
        where = f"{name} row {row_no}"
        x = _coordinate(_cell(row, col, "x"), "x", where)
        y = _coordinate(_cell(row, col, "y"), "y", where)
        class_name = _cell(row, col, "class") or None
        click_id = _cell(row, col, "id") if "id" in col else str(len(clicks) + 1)
        if not click_id:
            raise BridgeInputError(f"{where}: id is empty")
        if click_id in seen_ids:
            raise BridgeInputError(f"{where}: id {click_id!r} repeats row {seen_ids[click_id]}")
        seen_ids[click_id] = row_no
        clicks.append(Click(x=x, y=y, id=click_id, class_name=class_name))
    if not clicks:
        raise BridgeInputError(f"{name} has a header (row {header_row}) but no clicks")
    return clicks


# ----------------------------------------------------------------------- GeoJSON


def _features(doc: Any, name: str) -> list[Any]:
    """The features of a FeatureCollection, a list of Features, or one Feature."""
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        kind = doc.get("type")
        if kind == "FeatureCollection":
            features = doc.get("features")
            if not isinstance(features, list):
                raise BridgeInputError(f"{name}: FeatureCollection has no 'features' list")
            return features
        if kind == "Feature":
            return [doc]
        raise BridgeInputError(
            f"{name}: top-level GeoJSON type is {kind!r}; expected a FeatureCollection, a list of Features or a Feature"
        )
    raise BridgeInputError(f"{name}: expected GeoJSON (a FeatureCollection), found a JSON {type(doc).__name__}")


def class_name_of(properties: Any) -> str | None:
    """QuPath class name: ``classification.name`` (>= 0.3) or a plain string."""
    if not isinstance(properties, dict):
        return None
    cls = properties.get("classification")
    if isinstance(cls, dict):
        cls = cls.get("name")
    if isinstance(cls, str) and cls.strip():
        return cls.strip()
    return None


def _point_coords(geometry: dict, where: str) -> list[Any]:
    """The coordinate pairs of a Point / MultiPoint (or points in a GeometryCollection)."""
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Point":
        return [coords]
    if kind == "MultiPoint":
        if not isinstance(coords, list):
            raise BridgeInputError(f"{where}: MultiPoint coordinates are not a list")
        return coords
    if kind == "GeometryCollection":
        out: list[Any] = []
        for sub in geometry.get("geometries") or []:
            if isinstance(sub, dict):
                out.extend(_point_coords(sub, where))
        return out
    return []


def _read_geojson(path: Path) -> list[Click]:
    """Point and MultiPoint features of a QuPath GeoJSON export, one click per point."""
    name = path.name
    text = _read_text(path)
    if not text.strip():
        raise BridgeInputError(f"{name} is empty: no clicks")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BridgeInputError(f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    features = _features(doc, name)

    # QuPath 0.2 wrote the object type as "id" (e.g. "PathDetectionObject"), so a
    # feature id is used only when it is unique in the file.
    raw_ids = [f.get("id") if isinstance(f, dict) else None for f in features]
    id_counts = Counter(str(i) for i in raw_ids if isinstance(i, (str, int)) and not isinstance(i, bool))

    clicks: list[Click] = []
    ignored: Counter[str] = Counter()
    for number, feature in enumerate(features, start=1):
        where = f"{name} feature {number}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise BridgeInputError(f"{where} is not a GeoJSON Feature")
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict):
            ignored["no geometry"] += 1
            continue
        points = _point_coords(geometry, where)
        if not points:
            ignored[str(geometry.get("type"))] += 1
            continue
        raw = raw_ids[number - 1]
        fid = str(raw) if raw is not None and id_counts.get(str(raw)) == 1 else str(number)
        class_name = class_name_of(feature.get("properties"))
        for k, coords in enumerate(points, start=1):
            at = where if len(points) == 1 else f"{where} point {k}"
            if not isinstance(coords, list) or len(coords) < 2:
                raise BridgeInputError(f"{at}: point coordinates {coords!r} are not [x, y]")
            x = _coordinate(coords[0], "x", at)
            y = _coordinate(coords[1], "y", at)
            clicks.append(Click(x=x, y=y, id=f"{fid}:{k}", class_name=class_name))

    if ignored:
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(ignored.items()))
        if not clicks:
            raise BridgeInputError(
                f"{name} has no Point or MultiPoint features (found {summary}); export the clicks as points"
            )
        log.warning("%s: ignored %s feature(s) that are not points", name, summary)
    if not clicks:
        raise BridgeInputError(f"{name} has no features: no clicks")
    return clicks


# -------------------------------------------------------------------- checks


def validate_clicks(clicks: Sequence[Click], width: int, height: int) -> None:
    """Refuse a run that cannot do anything useful (no clicks, non-finite coordinates).

    Clicks outside the image are not an error here: see :func:`clicks_outside`.
    """
    if width <= 0 or height <= 0:
        raise BridgeInputError(f"image size {width}x{height} is empty")
    if not clicks:
        raise BridgeInputError("no clicks given: add at least one point per nucleus")
    for i, c in enumerate(clicks):
        if not (math.isfinite(c.x) and math.isfinite(c.y)):
            label = c.id or str(i + 1)
            raise BridgeInputError(f"click {label}: coordinates ({c.x}, {c.y}) are not finite")


def clicks_outside(clicks: Iterable[Click], width: int, height: int) -> list[int]:
    """Indices of clicks that are not inside ``[0, width) x [0, height)``.

    The engine reports these as not found rather than failing the whole run.
    Non-finite coordinates count as outside.
    """
    return [i for i, c in enumerate(clicks) if not (0 <= c.x < width and 0 <= c.y < height)]
