"""An OMERO image's training regions and nuclei, for ``nuclick-bridge adapt --omero``.

A region is a Rectangle or Polygon shape whose ROI (or the shape's own text)
carries the region name (``NuClick training`` by default): every nucleus
inside it is outlined.  Every other Polygon shape is a nucleus outline: the
polygons nuclick-bridge wrote after the annotator's edits, and polygons drawn
by hand.  Pixels come through the RawPixelsStore, only around the regions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import omero.clients  # noqa: F401  (loads every omero.model class, see model.py)
from omero.model import PolygonI, RectangleI
from omero.rtypes import unwrap
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

from bridge.connectors.omero.gateway import load_image
from bridge.connectors.omero.pixels import OmeroPixelsReader, check_rgb8
from bridge.errors import BridgeInputError
from bridge.io.coords import omero_to_level0
from bridge.io.regions import LabRegions, polygonal

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PAIR = re.compile(rf"({_NUMBER})\s*,\s*({_NUMBER})")


def polygon_vertices(points: str) -> list[tuple[float, float]]:
    """Level-0 vertices of an OMERO Polygon's ``points`` ("x1,y1 x2,y2 ...";
    the old "points[x1,y1, x2,y2] points1[...]" form too: its first list)."""
    text = points or ""
    old = re.search(r"points\[([^\]]*)\]", text)
    if old:
        text = old.group(1)
    return [omero_to_level0(float(x), float(y)) for x, y in _PAIR.findall(text)]


def shape_geometry(shape: Any) -> BaseGeometry | None:
    """A Rectangle or Polygon shape as a level-0 polygon; None for other shapes."""
    if isinstance(shape, RectangleI):
        x, y = omero_to_level0(unwrap(shape.getX()) or 0.0, unwrap(shape.getY()) or 0.0)
        w, h = unwrap(shape.getWidth()) or 0.0, unwrap(shape.getHeight()) or 0.0
        return polygonal(box(x, y, x + w, y + h))
    if isinstance(shape, PolygonI):
        vertices = polygon_vertices(unwrap(shape.getPoints()))
        return polygonal(Polygon(vertices)) if len(vertices) >= 3 else None
    return None


def _text(value: Any) -> str:
    v = unwrap(value)
    return v.strip() if isinstance(v, str) else ""


def split_shapes(rois: Iterable[Any], region_name: str) -> tuple[list[BaseGeometry], list[BaseGeometry], list[str]]:
    """(regions, nucleus outlines, where each region is) of one image's ROIs."""
    regions: list[BaseGeometry] = []
    nuclei: list[BaseGeometry] = []
    where: list[str] = []
    for roi in rois:
        roi_name = _text(roi.getName())
        for shape in roi.copyShapes():
            g = shape_geometry(shape)
            if g is None:
                continue
            if region_name in (roi_name, _text(shape.getTextValue())):
                regions.append(g)
                where.append(f"ROI {unwrap(roi.getId())}")
            elif isinstance(shape, PolygonI):
                nuclei.append(g)
    return regions, nuclei, where


def omero_regions(conn: Any, image_ids: Sequence[int], region_name: str) -> list[LabRegions]:
    """The images of ``image_ids`` that have regions, each with a pixel reader
    (close it when done); one clear error when none has."""
    out: list[LabRegions] = []
    for iid in image_ids:
        info = load_image(conn, iid)
        result = conn.getRoiService().findByImage(info.id, None, conn.SERVICE_OPTS)
        regions, nuclei, where = split_shapes(result.rois or [], region_name)
        if not regions:
            continue
        label = f"image {info.id} {info.name!r}"
        check_rgb8(info.size_c, info.pixels_type, label)
        reader = OmeroPixelsReader(
            conn.createRawPixelsStore(), info.pixels_id, info.width, info.height, ctx=conn.SERVICE_OPTS
        )
        out.append(LabRegions(label, reader, info.pixel_size_um, regions, nuclei, where))
    if not out:
        raise BridgeInputError(
            f"none of the {len(image_ids)} image(s) has a rectangle or polygon ROI named {region_name!r}: draw one "
            f"around nuclei you have outlined, name it {region_name!r}, and run adapt again (or name yours with "
            "--region-class)"
        )
    return out
