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
    calibration_from_metadata,
    detection_features,
    export_collection,
    extract_points,
    marker_for,
    new_run_id,
    our_detections,
    parse_marker,
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


def test_our_detections_are_found_by_marker_only():
    ours = {
        "type": "Feature",
        "id": "00000000-0000-4000-8000-00000000000a",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [2, 2], [0, 0]]]},
        "properties": {
            "objectType": "detection",
            "name": "nuclick-bridge r1 @1.000,1.000",
            "classification": {"name": "Tumor"},
        },
    }
    users = json.loads(json.dumps(ours))
    users["properties"]["name"] = "my nucleus"
    annotation_named_like_us = json.loads(json.dumps(ours))
    annotation_named_like_us["properties"]["objectType"] = "annotation"
    found = our_detections([ours, users, annotation_named_like_us])
    assert [(d.id, d.marker.key, d.class_name) for d in found] == [(ours["id"], "1.000,1.000", "Tumor")]


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
        assert props["metadata"]["nuclick_point_id"] == result.click.id
        json.dumps(feature, allow_nan=False)
    uncalibrated = detection_features(seg.results, run, None)
    assert all(AREA_UM not in f["properties"]["measurements"] for f in uncalibrated)


def test_what_qupath_keeps_still_carries_the_marker_and_exports_like_segment(segmentation):
    _, _, seg = segmentation
    features = detection_features(seg.results, "r1", Calibration(0.5, 0.5))
    stored = [as_stored_by_qupath(f) for f in features]  # QuPath drops our extra 'nuclick' property
    assert all("nuclick" not in f["properties"] for f in stored)
    assert len(our_detections(stored)) == len(features)
    collection = export_collection(stored)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(features)
    first, source = collection["features"][0], seg.results[0]
    assert first["geometry"] == stored[0]["geometry"]
    assert first["properties"]["objectType"] == "detection"
    assert first["properties"]["classification"]["name"] == source.click.class_name
    assert set(first["properties"]["measurements"]) == {AREA_PX, AREA_UM, PROBABILITY}
    nuclick = first["properties"]["nuclick"]
    assert nuclick["click_id"] == source.click.id and nuclick["run_id"] == "r1"
    assert math.isclose(nuclick["click_x"], source.click.x, abs_tol=5e-4)
    assert export_collection(stored, run_id="another")["features"] == []
