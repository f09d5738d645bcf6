"""A QuPath project's training regions and nuclei, for ``nuclick-bridge adapt``.

A region is an area annotation of one class (``NuClick training`` by
default): the annotator has outlined every nucleus inside it.  Every other
object with an area is a nucleus outline: our detections after the
annotator's edits, detections or annotations drawn by hand, and the nucleus
of a QuPath cell (its ``nucleusGeometry``).  Objects too large to be a
nucleus (a tissue or tumour annotation around the region) are left out.

Reads through the same small entry interface as the ``qupath`` command
(:class:`bridge.connectors.qupath.run.QuPathEntry`), so the paquo layer and
its test double serve both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from bridge.connectors.qupath.images import open_local_image
from bridge.connectors.qupath.objects import calibration_from_metadata, uri_to_path
from bridge.connectors.qupath.run import QuPathProjectLike, select_entries
from bridge.errors import BridgeInputError
from bridge.io.points import class_name_of
from bridge.io.regions import LabRegions, polygonal

# Larger than any nucleus (about 50 µm across); in px^2 at 0.25 µm when the image has no pixel size.
MAX_NUCLEUS_UM2 = 2000.0
MAX_NUCLEUS_PX2 = MAX_NUCLEUS_UM2 / 0.25**2


def _geometry(feature: dict, key: str = "geometry") -> BaseGeometry | None:
    try:
        return polygonal(shape(feature[key])) if isinstance(feature.get(key), dict) else None
    except Exception:  # malformed GeoJSON geometry: not an outline we can use
        return None


def split_objects(
    features: Sequence[dict], region_class: str, max_area_px: float
) -> tuple[list[BaseGeometry], list[BaseGeometry], int]:
    """(regions, nucleus outlines, objects left out as too large) of one image's
    annotations and detections as GeoJSON Features."""
    regions: list[BaseGeometry] = []
    nuclei: list[BaseGeometry] = []
    too_large = 0
    for f in features:
        if not isinstance(f, dict):
            continue
        props: dict[str, Any] = f.get("properties") if isinstance(f.get("properties"), dict) else {}
        kind = props.get("objectType", "annotation")
        if kind == "annotation" and class_name_of(props) == region_class:
            g = _geometry(f)
            if g is not None:
                regions.append(g)
            continue
        g = _geometry(f, "nucleusGeometry") if kind == "cell" and "nucleusGeometry" in f else _geometry(f)
        if g is None:
            continue
        if g.area > max_area_px:
            too_large += 1
            continue
        nuclei.append(g)
    return regions, nuclei, too_large


def project_regions(project: QuPathProjectLike, region_class: str, images: Sequence[str] = ()) -> list[LabRegions]:
    """Every image of ``project`` (or those named) that has regions; one clear
    error when none has."""
    out: list[LabRegions] = []
    entries = select_entries(project, images)
    for entry in entries:
        annotations, detections = entry.read_objects()
        metadata = entry.server_metadata() or {}
        cal = calibration_from_metadata(metadata)
        max_px = MAX_NUCLEUS_UM2 / (cal.pixel_width_um * cal.pixel_height_um) if cal else MAX_NUCLEUS_PX2
        regions, nuclei, _ = split_objects([*annotations, *detections], region_class, max_px)
        if not regions:
            continue
        reader = open_local_image(uri_to_path(entry.image_uri()))
        where = [f"region at ({r.bounds[0]:.0f}, {r.bounds[1]:.0f})" for r in regions]
        pixel_size = (cal.pixel_width_um + cal.pixel_height_um) / 2 if cal else None
        out.append(LabRegions(entry.name, reader, pixel_size, regions, nuclei, where))
    if not out:
        raise BridgeInputError(
            f"no image of {len(entries)} in the project has an area annotation of class {region_class!r}: draw a "
            "rectangle or polygon around nuclei you have outlined, set its class to "
            f"{region_class!r}, save the project, and run adapt again (or name your class with --region-class)"
        )
    return out
