"""omero.model objects <-> the connector's plain records (needs omero-py).

Reading: every Point shape of an image's ROIs becomes a
:class:`~bridge.connectors.omero.core.PointRecord` (theZ/theT kept, textValue
as the class); ROIs whose description carries our marker become
:class:`~bridge.connectors.omero.core.OurRoi`.  Writing: one
:class:`~bridge.connectors.omero.core.PolygonSpec` becomes one ``RoiI``
holding one ``PolygonI``, with a ``MapAnnotationI`` in our namespace linked to
it, ready for ``saveAndReturnArray``.

Why ``import omero.clients`` first: omero-py fills ``omero.model`` with its
classes as a side effect of loading the client; after ``import omero.rtypes``
alone, ``from omero.model import ImageI`` fails ("unknown location").
"""

from __future__ import annotations

from collections.abc import Iterable

import omero.clients  # noqa: F401  (loads every omero.model class: see the docstring)
from omero.model import ImageI, LengthI, MapAnnotationI, NamedValue, PointI, PolygonI, RoiI
from omero.model.enums import UnitsLength
from omero.rtypes import rint, rstring, unwrap

from bridge.connectors.omero.core import (
    NAMESPACE,
    STROKE_WIDTH,
    OurRoi,
    PointRecord,
    PolygonSpec,
    parse_description,
)


def _class_name(shape) -> str | None:
    text = unwrap(shape.getTextValue())
    text = text.strip() if isinstance(text, str) else ""
    return text or None


def _opt_int(value) -> int | None:
    v = unwrap(value)
    return None if v is None else int(v)


def records_from_rois(rois: Iterable[RoiI]) -> tuple[list[PointRecord], list[OurRoi]]:
    """The image's Point shapes (sorted by shape id) and the ROIs that are ours."""
    points: list[PointRecord] = []
    ours: list[OurRoi] = []
    for roi in rois:
        roi_id = int(unwrap(roi.getId()))
        shapes = list(roi.copyShapes())
        mark = parse_description(unwrap(roi.getDescription()))
        if mark is not None:
            only_polygons = bool(shapes) and all(isinstance(s, PolygonI) for s in shapes)
            ours.append(OurRoi(roi_id, mark[0], mark[1], only_polygons))
        for shape in shapes:
            if not isinstance(shape, PointI):
                continue
            x, y = unwrap(shape.getX()), unwrap(shape.getY())
            points.append(
                PointRecord(
                    shape_id=int(unwrap(shape.getId())),
                    roi_id=roi_id,
                    x=float("nan") if x is None else float(x),
                    y=float("nan") if y is None else float(y),
                    z=_opt_int(shape.getTheZ()),
                    t=_opt_int(shape.getTheT()),
                    class_name=_class_name(shape),
                )
            )
    points.sort(key=lambda p: p.shape_id)
    return points, ours


def build_roi(spec: PolygonSpec, image_id: int) -> RoiI:
    """One unsaved ROI with one Polygon and its linked MapAnnotation."""
    poly = PolygonI()
    poly.setPoints(rstring(spec.points))
    if spec.z is not None:
        poly.setTheZ(rint(spec.z))
    if spec.t is not None:
        poly.setTheT(rint(spec.t))
    if spec.class_name:
        poly.setTextValue(rstring(spec.class_name))
    poly.setStrokeColor(rint(spec.stroke))
    poly.setStrokeWidth(LengthI(STROKE_WIDTH, UnitsLength.PIXEL))

    roi = RoiI()
    roi.setImage(ImageI(int(image_id), False))
    roi.setName(rstring(f"nucleus {spec.class_name}" if spec.class_name else "nucleus"))
    roi.setDescription(rstring(spec.description))
    roi.addShape(poly)

    ann = MapAnnotationI()
    ann.setNs(rstring(NAMESPACE))
    ann.setMapValue([NamedValue(k, v) for k, v in spec.key_values()])
    roi.linkAnnotation(ann)
    return roi
