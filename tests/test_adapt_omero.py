"""``adapt --omero``'s reader: regions and nuclei from real omero-py ROI objects
(Rectangle and Polygon shapes) through the in-memory OMERO's gateway and
RawPixelsStore, the image's physical pixel size, and the clear errors."""

from __future__ import annotations

import argparse

import numpy as np
import omero_env
import pytest

if reason := omero_env.skip_reason():
    pytest.skip(reason, allow_module_level=True)

from omero.model import LengthI, PointI, PolygonI, RectangleI, RoiI
from omero.model.enums import UnitsLength
from omero.rtypes import rdouble, rstring

from bridge.commands.adapt import omero_items
from bridge.connectors.omero.regions import polygon_vertices, split_shapes
from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import instance_slices
from support.omero_memory import InMemoryOmero


def _polygon(mask: np.ndarray, offset: tuple[int, int]) -> PolygonI:
    """The outline of a pixel mask's bounding pixels as an OMERO polygon (a
    rectangle's corners, exact in pixel edges)."""
    rows, cols = np.nonzero(mask)
    x0, y0 = cols.min() + offset[1], rows.min() + offset[0]
    x1, y1 = cols.max() + 1 + offset[1], rows.max() + 1 + offset[0]
    p = PolygonI()
    p.setPoints(rstring(f"{x0},{y0} {x1},{y0} {x1},{y1} {x0},{y1}"))
    return p


def _rectangle(x, y, w, h) -> RectangleI:
    r = RectangleI()
    r.setX(rdouble(x))
    r.setY(rdouble(y))
    r.setWidth(rdouble(w))
    r.setHeight(rdouble(h))
    return r


def _roi(*shapes, name: str | None = None) -> RoiI:
    roi = RoiI()
    if name:
        roi.setName(rstring(name))
    for s in shapes:
        roi.addShape(s)
    return roi


def test_polygon_points_both_forms():
    assert polygon_vertices("1,2 3.5,4 -1e1,6") == [(1.0, 2.0), (3.5, 4.0), (-10.0, 6.0)]
    assert polygon_vertices("points[1,2, 3,4, 5,6] points1[1,2, 3,4, 5,6] mask[0,0,0]") == [(1, 2), (3, 4), (5, 6)]


def _args(**kw) -> argparse.Namespace:
    base = {"image": [], "dataset": None, "project": None, "region_class": "NuClick training", "pixel_size": None}
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def server(crop_pair):
    image, labels = crop_pair
    server = InMemoryOmero(tile_size=(64, 64))
    img = server.add_image(7, image)
    for axis in ("X", "Y"):
        getattr(img.getPrimaryPixels(), f"setPhysicalSize{axis}")(LengthI(250, UnitsLength.NANOMETER))
    slices = instance_slices(labels)
    nuclei = [_roi(_polygon(labels[sl] == i, (sl[0].start, sl[1].start))) for i, sl in list(slices.items())[:40]]
    point = PointI()
    point.setX(rdouble(10.0))
    point.setY(rdouble(10.0))
    server.add_rois(
        7,
        [
            _roi(_rectangle(60, 60, 120, 120), name="NuClick training"),
            _roi(point),  # a click: neither region nor nucleus
            *nuclei,
        ],
    )
    server.add_image(8, image)  # no regions
    return server


def test_omero_regions_become_training_images(server, crop_pair):
    image, _ = crop_pair
    conn = server.connect()
    (sample,) = omero_items(conn, _args(image=["7", "8"]), 0.25)
    # the rectangle grown by the 64-pixel margin, read through the RawPixelsStore in 64 px tiles
    np.testing.assert_array_equal(sample.image, image[0:244, 0:244])
    assert sample.known[64:180, 64:180].all() and sample.targets
    assert sample.name.startswith("image 7 ")


def test_omero_pixel_size_converts_units_and_missing_one_is_refused(server):
    conn = server.connect()
    from bridge.connectors.omero.gateway import load_image

    assert load_image(conn, 7).pixel_size_um == pytest.approx(0.25)
    assert load_image(conn, 8).pixel_size_um is None
    server.add_rois(
        8, [_roi(_rectangle(0, 0, 50, 50), name="NuClick training"), _roi(_polygon(np.ones((5, 5)), (10, 10)))]
    )
    with pytest.raises(BridgeInputError, match="image 8 'slide': the image has no pixel size"):
        omero_items(conn, _args(image=["8"]), 0.25)
    (sample,) = omero_items(conn, _args(image=["8"], pixel_size=0.25), 0.25)
    assert len(sample.targets) == 1


def test_omero_errors_are_one_line(server):
    conn = server.connect()
    with pytest.raises(BridgeInputError, match=r"none of the 1 image.*named 'Lab'"):
        omero_items(conn, _args(image=["7"], region_class="Lab"), 0.25)
    with pytest.raises(BridgeInputError, match="--image takes image ids"):
        omero_items(conn, _args(image=["slide.svs"]), 0.25)
    with pytest.raises(BridgeInputError, match="--omero needs the images"):
        omero_items(conn, _args(), 0.25)


def test_shape_text_or_roi_name_marks_a_region():
    rect = _rectangle(0, 0, 10, 10)
    rect.setTextValue(rstring("NuClick training"))
    regions, nuclei, where = split_shapes([_roi(rect), _roi(_polygon(np.ones((3, 3)), (2, 2)))], "NuClick training")
    assert len(regions) == 1 and len(nuclei) == 1 and len(where) == 1
