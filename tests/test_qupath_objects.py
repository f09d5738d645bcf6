"""The paquo-free half of the QuPath connector, object by object: points out of
QuPath GeoJSON annotations, markers, calibration, URIs, and detections built
from a real segmentation of a MoNuSeg crop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from shapely.geometry import Point, shape

from bridge.connectors.qupath.objects import (
    AREA_PX,
    AREA_UM,
    PROBABILITY,
    Calibration,
    Marker,
    annotation_id_of,
    calibration_from_metadata,
    detection_features,
    export_collection,
    extract_points,
    marker_for,
    new_run_id,
    our_nuclei,
    parse_marker,
    point_index,
    point_key,
    size_from_metadata,
    uri_to_path,
)
from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import simulate_clicks
from bridge.evaluation.watershed import WatershedSegmenter
from bridge.io.geojson import class_color
from bridge.io.imageio import ArrayReader
from bridge.results import Click
from support.qupath_memory import as_stored_by_qupath

TUMOR_ID = "6f1d1c47-7d0a-4c1e-9a53-0c3f5b2e8a11"


def points_feature(coords, cls=None, fid=None, kind="MultiPoint"):
    """A point annotation as QuPath 0.6 writes it."""
    feature = {
        "type": "Feature",
        "geometry": {"type": kind, "coordinates": coords},
        "properties": {"objectType": "annotation"},
    }
    if fid:
        feature["id"] = fid
    if cls:
        feature["properties"]["classification"] = {"name": cls, "color": class_color(cls)}
    return feature


def test_every_point_of_multipoint_annotations_in_its_class():
    features = [
        points_feature([[10.5, 20.25], [30.0, 40.0], [50.75, 60.0]], "Tumor", TUMOR_ID),
        points_feature([[70.0, 80.0]], "Immune cells", "b4c5d6e7-0000-4000-8000-000000000002"),
        points_feature([5.0, 6.0], None, "c0000000-0000-4000-8000-000000000003", kind="Point"),
        # not points: a region annotation and a detection are not clicks
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [1.0, 1.0]},
            "properties": {"objectType": "detection"},
        },
    ]
    got = extract_points(features)
    assert [(c.x, c.y, c.class_name) for c in got.clicks] == [
        (10.5, 20.25, "Tumor"),
        (30.0, 40.0, "Tumor"),
        (50.75, 60.0, "Tumor"),
        (70.0, 80.0, "Immune cells"),
        (5.0, 6.0, None),
    ]
    assert [c.id for c in got.clicks[:3]] == [f"{TUMOR_ID}:1", f"{TUMOR_ID}:2", f"{TUMOR_ID}:3"]
    assert dict(got.by_class) == {"Tumor": 3, "Immune cells": 1, "Unclassified": 1}
    assert got.problems == [] and got.other_classes == 0


def test_class_filter_and_unclassified():
    features = [
        points_feature([[1.0, 1.0], [2.0, 2.0]], "Tumor", TUMOR_ID),
        points_feature([[3.0, 3.0]], "Stroma"),
        points_feature([[4.0, 4.0]]),
    ]
    tumor = extract_points(features, ["Tumor"])
    assert [c.class_name for c in tumor.clicks] == ["Tumor", "Tumor"] and tumor.other_classes == 2
    both = extract_points(features, ["Stroma", "Unclassified"])
    assert [(c.x, c.class_name) for c in both.clicks] == [(3.0, "Stroma"), (4.0, None)]
    assert both.clicks[0].id == "#2:1"  # no QuPath id (QuPath < 0.4): the feature number
    assert extract_points(features, ["Necrosis"]).clicks == []


def test_bad_and_repeated_points_are_reported_not_used():
    features = [points_feature([[1.0, 1.0], [1.0, 1.0], ["a", 2.0], [3.0, float("nan")], [4.0]], "Tumor", TUMOR_ID)]
    got = extract_points(features)
    assert [(c.x, c.y) for c in got.clicks] == [(1.0, 1.0)]
    assert len(got.problems) == 4
    assert "repeats point" in got.problems[0] and f"{TUMOR_ID}:2" in got.problems[0]
    assert any("not finite" in p for p in got.problems)


def test_marker_round_trip_and_foreign_names():
    run = new_run_id()
    click = Click(1234.56789, 0.5, "a:1", "Tumor")
    marker = marker_for(run, click)
    assert marker.key == point_key(1234.56789, 0.5) == "1234.568,0.500"
    assert marker.name == f"nuclick-bridge {run} @1234.568,0.500"
    assert parse_marker(marker.name) == marker
    assert parse_marker(Marker("r1", point_key(-0.2, 3)).name) == Marker("r1", "-0.200,3.000")
    for foreign in (None, 3, "", "Nucleus 1", "nuclick-bridge", "nuclick-bridge r1 @1,2", "xnuclick-bridge r @1.0,2.0"):
        assert parse_marker(foreign) is None
    with pytest.raises(ValueError):
        marker_for("bad id", click)


POINTS_A = "3b7e2c10-5f0e-4a53-9d61-7c0b8e2f4a01"  # a point annotation (Tumor)
POINTS_B = "9c2d4e61-1a2b-4c3d-8e4f-5a6b7c8d9e02"  # another one (Immune cells)
GONE = "0d1e2f30-4a5b-4c6d-9e7f-8a9b0c1d2e03"  # a point annotation the user deleted


def nucleus(fid, key, kind="detection", cls="Tumor", point_id=None, run="r1", name=None):
    """One of our nuclei as QuPath 0.6 stores it (GeoJSON written by GsonTools):
    ``kind`` detection (this connector) or annotation (the extension); QuPath 0.6
    keeps string metadata on every object type."""
    x, y = (float(v) for v in key.split(","))
    metadata = {"nuclick_run": run, "nuclick_point": key}
    if point_id is not None:
        metadata["nuclick_point_id"] = point_id
    return {
        "type": "Feature",
        "id": fid,
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[x - 3, y - 3], [x + 3, y - 3], [x + 3, y + 3], [x - 3, y + 3], [x - 3, y - 3]]],
        },
        "properties": {
            "objectType": kind,
            "name": name or f"nuclick-bridge {run} @{key}",
            "classification": {"name": cls, "color": class_color(cls)},
            "measurements": {"Area px^2": 36.0, "NuClick probability": 0.9},
            "metadata": metadata,
        },
    }


def test_our_nuclei_are_found_by_marker_as_detections_and_annotations():
    """The extension's annotations are ours too (the connector duplicated them
    before); objects without the marker, and point annotations, never are."""
    ids = [f"00000000-0000-4000-8000-00000000000{k}" for k in range(8)]
    connector = nucleus(ids[0], "10.000,10.000", "detection", point_id=POINTS_A)
    extension = nucleus(ids[1], "20.000,20.000", "annotation", "Immune cells", POINTS_B, run="x7")
    released = nucleus(ids[2], "30.000,30.000", "annotation")  # its point was removed on purpose
    legacy = nucleus(ids[3], "40.000,40.000", point_id=f"{POINTS_A}:4")  # before point ids were annotation ids
    users = nucleus(ids[4], "50.000,50.000", name="my nucleus")
    cell = nucleus(ids[5], "60.000,60.000", "cell")
    point_named_like_us = points_feature([[70.0, 70.0]], "Tumor", ids[6])
    point_named_like_us["properties"]["name"] = "nuclick-bridge r1 @70.000,70.000"
    features = [connector, extension, released, legacy, users, cell, point_named_like_us]
    stored = [as_stored_by_qupath(f) for f in features]
    found = our_nuclei(stored)
    assert [(n.id, n.marker.key, n.class_name, n.point_id, n.object_type) for n in found] == [
        (ids[0], "10.000,10.000", "Tumor", POINTS_A, "detection"),
        (ids[1], "20.000,20.000", "Immune cells", POINTS_B, "annotation"),
        (ids[2], "30.000,30.000", "Tumor", None, "annotation"),
        (ids[3], "40.000,40.000", "Tumor", POINTS_A, "detection"),
    ]


def test_orphan_rule():
    """An orphan records a point id, and that annotation no longer holds a
    point at its key; nothing else is an orphan."""
    annotations = [
        points_feature([[10.0, 10.0], [11.0, 11.0]], "Tumor", POINTS_A),
        points_feature([[20.0, 20.0]], "Immune cells", POINTS_B),
        points_feature([[99.0, 99.0]], "Tumor"),  # no id (QuPath < 0.4): never in the index
    ]
    index = point_index(annotations)
    assert index == {(POINTS_A, "10.000,10.000"), (POINTS_A, "11.000,11.000"), (POINTS_B, "20.000,20.000")}
    cases = {
        "point still there": (nucleus("a", "10.000,10.000", point_id=POINTS_A), False),
        "legacy id, point there": (nucleus("b", "11.000,11.000", point_id=f"{POINTS_A}:2"), False),
        "extension annotation, point there": (nucleus("c", "20.000,20.000", "annotation", point_id=POINTS_B), False),
        "released (no point id)": (nucleus("d", "30.000,30.000", "annotation"), False),
        "annotation deleted": (nucleus("e", "40.000,40.000", point_id=GONE), True),
        "point deleted from its annotation": (nucleus("f", "12.000,12.000", point_id=POINTS_A), True),
        "point now in another annotation": (nucleus("g", "20.000,20.000", point_id=POINTS_A), True),
    }
    for what, (feature, orphan) in cases.items():
        (found,) = our_nuclei([as_stored_by_qupath(feature)])
        assert found.is_orphan(index) is orphan, what
    assert annotation_id_of(f"{POINTS_A}:12") == POINTS_A == annotation_id_of(POINTS_A.upper())
    assert annotation_id_of("#2:1") is None and annotation_id_of("") is None


def test_calibration_and_size_from_server_metadata():
    meta = {
        "width": 4000,
        "height": 3000,
        "pixelCalibration": {
            "pixelWidth": {"value": 0.2527, "unit": "µm"},
            "pixelHeight": {"value": 0.2527, "unit": "µm"},
            "zSpacing": {"value": 1.0, "unit": "z-slice"},
        },
    }
    cal = calibration_from_metadata(meta)
    assert cal == Calibration(0.2527, 0.2527)
    assert cal.area_um2(100.0) == pytest.approx(100 * 0.2527**2)
    assert size_from_metadata(meta) == (4000, 3000)
    px = {"value": 1, "unit": "px"}
    uncalibrated = {"pixelCalibration": {"pixelWidth": px, "pixelHeight": px}}
    assert calibration_from_metadata(uncalibrated) is None
    assert calibration_from_metadata({}) is None and calibration_from_metadata(None) is None
    bad = {"pixelCalibration": {"pixelWidth": {"value": -1, "unit": "µm"}, "pixelHeight": {"value": 1, "unit": "µm"}}}
    assert calibration_from_metadata(bad) is None
    assert size_from_metadata({"width": "10"}) is None


def test_uri_to_path():
    assert uri_to_path("file:/data/slides/a%20b.svs") == Path("/data/slides/a b.svs")
    assert uri_to_path("file:///data/x.ome.tif") == Path("/data/x.ome.tif")
    assert uri_to_path("file://localhost/data/x.tif") == Path("/data/x.tif")
    assert str(uri_to_path("file:/C:/slides/x.svs")).replace("\\", "/") == "C:/slides/x.svs"
    assert str(uri_to_path("file://server/share/x.svs")).replace("\\", "/") == "//server/share/x.svs"
    path = Path("/tmp/some dir/slide #1.tif")
    assert uri_to_path(path.as_uri()) == path
    for bad in ("https://omero.example.org/webclient/img_detail/51/", "omero://host/51", "", "/plain/path.tif"):
        with pytest.raises(BridgeInputError):
            uri_to_path(bad)


@pytest.fixture(scope="module")
def segmentation(crop_pair):
    img, lab = crop_pair
    xy, _ = simulate_clicks(lab, jitter=3, seed=1)
    classes = ["Tumor", "Immune cells"]
    clicks = [Click(float(x), float(y), f"{TUMOR_ID}:{k + 1}", classes[k % 2]) for k, (x, y) in enumerate(xy)]
    clicks.append(Click(300.0, 10.0, "off:1", "Tumor"))  # off the 256 x 256 crop
    seg = WatershedSegmenter().segment(ArrayReader(img), clicks)
    return img, clicks, seg


def test_detections_have_valid_polygons_classes_measurements_and_marker(segmentation):
    img, _, seg = segmentation
    run = "20250101-000000-abcd"
    cal = Calibration(0.25, 0.5)
    features = detection_features(seg.results, run, cal)
    found = [r for r in seg.results if r.found]
    assert len(features) == len(found) > 20
    assert not seg.results[-1].found and "outside" in seg.results[-1].reason
    for feature, result in zip(features, found, strict=True):
        props = feature["properties"]
        poly = shape(feature["geometry"])
        assert feature["type"] == "Feature" and poly.geom_type == "Polygon" and poly.is_valid
        assert poly.bounds[0] >= 0 and poly.bounds[2] <= img.shape[1] and poly.bounds[3] <= img.shape[0]
        assert poly.buffer(1.0).contains(Point(result.click.x, result.click.y))
        assert props["objectType"] == "detection"
        name = result.click.class_name
        assert props["classification"] == {"name": name, "color": class_color(name)}
        m = props["measurements"]
        assert m[AREA_PX] == pytest.approx(poly.area) and m[AREA_PX] > 10
        assert m[AREA_UM] == pytest.approx(m[AREA_PX] * 0.125)
        assert 0 < m[PROBABILITY] <= 1
        assert parse_marker(props["name"]) == Marker(run, point_key(result.click.x, result.click.y))
        key = point_key(result.click.x, result.click.y)
        assert props["metadata"] == {"nuclick_run": run, "nuclick_point": key, "nuclick_point_id": TUMOR_ID}
        json.dumps(feature, allow_nan=False)
    uncalibrated = detection_features(seg.results, run, None)
    assert all(AREA_UM not in f["properties"]["measurements"] for f in uncalibrated)


def test_what_qupath_keeps_still_carries_the_marker_and_exports_like_segment(segmentation):
    _, _, seg = segmentation
    features = detection_features(seg.results, "r1", Calibration(0.5, 0.5))
    stored = [as_stored_by_qupath(f) for f in features]  # QuPath drops our extra 'nuclick' property
    assert all("nuclick" not in f["properties"] for f in stored)
    assert len(our_nuclei(stored)) == len(features)
    collection = export_collection(stored)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(features)
    first, source = collection["features"][0], seg.results[0]
    assert first["geometry"] == stored[0]["geometry"]
    assert first["properties"]["objectType"] == "detection"
    assert first["properties"]["classification"]["name"] == source.click.class_name
    assert set(first["properties"]["measurements"]) == {AREA_PX, AREA_UM, PROBABILITY}
    nuclick = first["properties"]["nuclick"]
    assert nuclick["click_id"] == TUMOR_ID and nuclick["run_id"] == "r1"  # the point annotation's id
    assert math.isclose(nuclick["click_x"], source.click.x, abs_tol=5e-4)
    assert export_collection(stored, run_id="another")["features"] == []
