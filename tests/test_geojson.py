"""GeoJSON output: round trip through a real file, QuPath fields, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Point, Polygon, shape
from skimage.draw import ellipse
from skimage.measure import find_contours

from bridge.io.geojson import (
    atomic_write_bytes,
    atomic_write_text,
    class_color,
    results_to_feature_collection,
    write_geojson,
)
from bridge.io.points import read_points
from bridge.results import Click, NucleusResult


def mask_polygon(cx: float, cy: float) -> Polygon:
    """A nucleus-like polygon traced from a real mask, in level-0 coordinates."""
    mask = np.zeros((40, 40), bool)
    rr, cc = ellipse(20, 20, 9, 6, rotation=0.4)
    mask[rr, cc] = True
    contour = max(find_contours(mask.astype(float), 0.5), key=len)  # (row, col)
    return Polygon(np.c_[contour[:, 1] + cx - 20 + 0.5, contour[:, 0] + cy - 20 + 0.5])


@pytest.fixture
def results() -> list[NucleusResult]:
    p1, p2 = mask_polygon(120.5, 80.5), Point(400, 300).buffer(7.5)
    return [
        NucleusResult(Click(120.5, 80.5, "1", "Tumor"), True, p1, area_px=p1.area, score=0.93),
        NucleusResult(Click(10.0, 10.0, "2", None), False, reason="no nucleus under click"),
        NucleusResult(Click(400.0, 300.0, "3", "Lymphocyte"), True, p2, area_px=176.0, score=0.71),
        NucleusResult(Click(50.0, 60.0, "4"), True, Point(50, 60).buffer(4), area_px=0.0, score=float("nan")),
    ]


def test_round_trip(tmp_path: Path, results: list[NucleusResult]) -> None:
    out = tmp_path / "nuclei.geojson"
    assert write_geojson(out, results) == 3
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection"
    features = doc["features"]
    assert [f["properties"]["nuclick"]["click_id"] for f in features] == ["1", "3", "4"]
    assert len({f["id"] for f in features}) == 3
    for f, r in zip(features, [results[0], results[2], results[3]], strict=True):
        assert f["type"] == "Feature"
        assert uuid.UUID(f["id"]).version == 4
        geom = shape(f["geometry"])
        assert geom.is_valid and geom.geom_type == "Polygon"
        assert geom.equals_exact(r.polygon, 1e-9)
        assert geom.representative_point().within(r.polygon)
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["nuclick"] == {"click_id": r.click.id, "click_x": r.click.x, "click_y": r.click.y}
        assert Point(r.click.x, r.click.y).within(geom)
    m0, m1, m2 = (f["properties"]["measurements"] for f in features)
    assert m0 == {"Area px^2": pytest.approx(results[0].polygon.area), "NuClick probability": 0.93}
    assert m1 == {"Area px^2": 176.0, "NuClick probability": 0.71}
    assert m2 == {"Area px^2": pytest.approx(results[3].polygon.area)}  # area from polygon, NaN dropped
    assert features[0]["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert features[1]["properties"]["classification"] == {"name": "Lymphocyte", "color": class_color("Lymphocyte")}
    assert "classification" not in features[2]["properties"]
    assert "NaN" not in out.read_text()


def test_feature_collection_is_plain_json_data(results: list[NucleusResult]) -> None:
    fc = results_to_feature_collection(results, object_type="annotation")
    geom = fc["features"][0]["geometry"]
    assert geom["type"] == "Polygon"
    assert isinstance(geom["coordinates"], list) and isinstance(geom["coordinates"][0][0], list)
    assert all(type(v) is float for ring in geom["coordinates"] for xy in ring for v in xy)
    assert {f["properties"]["objectType"] for f in fc["features"]} == {"annotation"}
    with pytest.raises(ValueError, match="object_type"):
        results_to_feature_collection(results, object_type="cell")
    assert results_to_feature_collection([]) == {"type": "FeatureCollection", "features": []}


def test_output_is_not_mistaken_for_clicks(tmp_path: Path, results: list[NucleusResult]) -> None:
    """Feeding our polygon output back as clicks is a clear error, not zero clicks."""
    out = tmp_path / "nuclei.geojson"
    write_geojson(out, results)
    with pytest.raises(ValueError, match="3 Polygon"):
        read_points(out)


def test_class_color_is_stable() -> None:
    assert class_color("Tumor") == [200, 0, 0]
    assert class_color("Stroma") == [150, 200, 150]
    assert class_color("Immune cells") == [160, 90, 160]
    assert class_color("Necrosis") == [50, 50, 50]
    assert class_color("Other") == [255, 200, 0]
    names = ["Lymphocyte", "Epithelial", "Mitosis", "Neutrophil", ""]
    colours = [class_color(n) for n in names]
    assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in colours)
    assert len({tuple(c) for c in colours}) == len(names)
    # Same in a fresh interpreter (Python's own hash() is salted per process).
    code = f"from bridge.io.geojson import class_color; print([class_color(n) for n in {names!r}])"
    env = dict(os.environ, PYTHONHASHSEED="random")
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=Path(__file__).parents[1]
    )
    assert json.loads(other.stdout) == colours


def test_atomic_write_replaces_and_sets_normal_mode(tmp_path: Path) -> None:
    target = tmp_path / "out.geojson"
    atomic_write_text(target, "first\n")
    atomic_write_bytes(target, b"second\n")
    assert target.read_bytes() == b"second\n"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.geojson"]


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.geojson"
    target.write_text("old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.geojson"]
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing-dir" / "x.geojson", "data")


def test_write_geojson_failure_keeps_previous_output(tmp_path: Path, results: list[NucleusResult]) -> None:
    out = tmp_path / "nuclei.geojson"
    write_geojson(out, results)
    before = out.read_bytes()
    broken = [NucleusResult(Click(1.0, 1.0, "x"), True, polygon=None)]
    with pytest.raises(ValueError, match="no polygon"):
        write_geojson(out, results + broken)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nuclei.geojson"]
