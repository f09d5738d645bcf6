"""Click files (CSV and QuPath GeoJSON) written for real, good and bad."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from bridge.errors import BridgeInputError
from bridge.io.points import clicks_outside, read_points, validate_clicks
from bridge.results import Click


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def bad(path: Path, *fragments: str) -> str:
    with pytest.raises(BridgeInputError) as info:
        read_points(path)
    msg = str(info.value)
    assert "\n" not in msg and path.name in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


# --------------------------------------------------------------------------- CSV


def test_csv_xy(tmp_path: Path) -> None:
    clicks = read_points(write(tmp_path, "c.csv", "x,y\n10.5,20.25\n\n3,4\n"))
    assert clicks == [Click(10.5, 20.25, "1"), Click(3.0, 4.0, "2")]


def test_csv_class_extra_columns_and_case(tmp_path: Path) -> None:
    text = "\ufeffName, X ,Y,Class,area\na,1,2,Tumor,5\nb,3,4,,6\nc,5,6, Immune cells ,7\n"
    clicks = read_points(write(tmp_path, "c.csv", text))
    assert [(c.x, c.y, c.id, c.class_name) for c in clicks] == [
        (1, 2, "1", "Tumor"),
        (3, 4, "2", None),
        (5, 6, "3", "Immune cells"),
    ]


def test_csv_id_column_and_tabs(tmp_path: Path) -> None:
    clicks = read_points(write(tmp_path, "c.csv", "id\tx\ty\nn7\t1\t2\nn3\t3\t4\n"))
    assert [c.id for c in clicks] == ["n7", "n3"]
    bad(write(tmp_path, "d.csv", "id,x,y\na,1,2\na,3,4\n"), "row 3", "repeats row 2")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ("empty", "no clicks")),
        ("\n  \n", ("empty", "no clicks")),
        ("x,y\n", ("no clicks",)),
        ("x,z\n1,2\n", ("row 1", "no y column")),
        ("a,b\n1,2\n", ("no x or y column",)),
        ("x,y\n1,2\nabc,3\n", ("row 3", "x='abc' is not a number")),
        ("x,y\n1,nan\n", ("row 2", "y=nan is not a finite")),
        ("x,y\n1,2\n3,4\ninf,4\n", ("row 4", "x=inf")),
        ("x,y\n1,\n", ("row 2", "y is empty")),
        ("x,y,class\n1\n", ("row 2", "y is empty")),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, fragments: tuple[str, ...]) -> None:
    bad(write(tmp_path, "clicks.csv", text), *fragments)


def test_missing_and_unsupported(tmp_path: Path) -> None:
    bad(tmp_path / "nope.csv", "not found")
    bad(write(tmp_path, "p.xlsx", "x"), "unsupported")
    (tmp_path / "latin.csv").write_bytes(b"x,y,class\n1,2,Tum\xe9r\n")
    bad(tmp_path / "latin.csv", "not UTF-8")


# ----------------------------------------------------------------------- GeoJSON


def qupath_export() -> dict:
    """As QuPath >= 0.4 exports points: a MultiPoint per points annotation, with a class."""
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": "6d1c0f2e-3b1a-4c55-9a8e-0c7c1f2f1a01",
                "geometry": {"type": "MultiPoint", "coordinates": [[101.5, 202.25], [300, 400], [5.0, 6.0]]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                },
            },
            {
                "type": "Feature",
                "id": "PathAnnotationObject",
                "geometry": {"type": "Point", "coordinates": [7, 8]},
                "properties": {"classification": "Stroma"},
            },
            {
                "type": "Feature",
                "id": "PathAnnotationObject",
                "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]},
                "properties": {"objectType": "annotation"},
            },
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [9, 10, 0]}, "properties": {}},
        ],
    }


def test_qupath_geojson_multipoint_with_class(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "points.geojson", json.dumps(qupath_export(), indent=2))
    with caplog.at_level(logging.WARNING):
        clicks = read_points(path)
    uid = "6d1c0f2e-3b1a-4c55-9a8e-0c7c1f2f1a01"
    assert clicks == [
        Click(101.5, 202.25, f"{uid}:1", "Tumor"),
        Click(300.0, 400.0, f"{uid}:2", "Tumor"),
        Click(5.0, 6.0, f"{uid}:3", "Tumor"),
        Click(7.0, 8.0, "2:1", "Stroma"),  # the repeated QuPath-0.2 "id" is not used
        Click(9.0, 10.0, "4:1", None),
    ]
    assert "1 Polygon" in caplog.text


def test_geojson_list_and_single_feature(tmp_path: Path) -> None:
    features = qupath_export()["features"]
    clicks = read_points(write(tmp_path, "list.json", json.dumps(features[:2])))
    assert len(clicks) == 4
    single = read_points(write(tmp_path, "one.json", json.dumps(features[1])))
    assert single == [Click(7.0, 8.0, "PathAnnotationObject:1", "Stroma")]


def test_geojson_only_polygons(tmp_path: Path) -> None:
    doc = qupath_export()
    doc["features"] = [doc["features"][2], doc["features"][2], {"type": "Feature", "geometry": None}]
    bad(write(tmp_path, "shapes.geojson", json.dumps(doc)), "no Point or MultiPoint", "2 Polygon", "1 no geometry")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('{"type": "FeatureCollection", "features": [', ("not valid JSON", "line 1")),
        ('{"type": "FeatureCollection",\n "features": [}\n', ("not valid JSON", "line 2 column")),
        ("", ("empty",)),
        ('{"type": "FeatureCollection", "features": []}', ("no features",)),
        ('{"type": "Point", "coordinates": [1, 2]}', ("'Point'", "expected a FeatureCollection")),
        ("42", ("found a JSON int",)),
        ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, NaN]}}]', ("feature 1", "y=nan")),
        (
            '[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}},'
            ' {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], ["a", 3]]}}]',
            ("feature 2 point 2", "x='a'"),
        ),
        ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1]}}]', ("feature 1", "not [x, y]")),
        ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [true, 1]}}]', ("x=True",)),
        ('[{"type": "Polygon"}]', ("feature 1 is not a GeoJSON Feature",)),
    ],
)
def test_geojson_errors(tmp_path: Path, text: str, fragments: tuple[str, ...]) -> None:
    bad(write(tmp_path, "clicks.geojson", text), *fragments)


# ------------------------------------------------------------------- checks


def test_validate_clicks() -> None:
    with pytest.raises(BridgeInputError, match="no clicks"):
        validate_clicks([], 100, 100)
    with pytest.raises(BridgeInputError, match=r"click a: .* not finite"):
        validate_clicks([Click(math.nan, 1.0, "a")], 100, 100)
    validate_clicks([Click(500.0, 1.0, "outside is fine here")], 100, 100)


def test_clicks_outside_edges() -> None:
    clicks = [
        Click(0.0, 0.0),
        Click(99.999, 49.999),
        Click(100.0, 10.0),
        Click(10.0, 50.0),
        Click(-0.001, 10.0),
        Click(10.0, -5.0),
        Click(math.nan, 10.0),
        Click(50.0, 25.0),
    ]
    assert clicks_outside(clicks, 100, 50) == [2, 3, 4, 5, 6]
