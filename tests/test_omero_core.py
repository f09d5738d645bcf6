"""The OMERO connector's omero-free core: polygon strings, colours, markers, plans, the CLI's flags."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Point, Polygon

from bridge.cli import build_parser, main
from bridge.connectors.omero.core import (
    COORD_DECIMALS,
    DEFAULT_COLOR,
    OurRoi,
    PointRecord,
    RunSummary,
    class_stroke,
    pack_rgba,
    parse_description,
    plan_image,
    polygon_points,
    polygon_specs,
    roi_description,
)
from bridge.io.geojson import class_color
from bridge.results import NucleusResult
from support.omero_shapes import parse_points, points_to_polygon, unpack_rgba

# ---------------------------------------------------------------- polygon strings


def test_polygon_points_is_canonical():
    poly = Polygon([(10, 20), (13.5, 20), (13.5, 24.25), (10, 24.25)])
    text = polygon_points(poly)
    # "x,y" pairs separated by single spaces, no closing repeat, shortest number text
    assert text == "10,20 13.5,20 13.5,24.25 10,24.25"
    assert text == polygon_points(Polygon(poly.exterior.coords))  # deterministic


def test_polygon_points_rounds_and_drops_repeats():
    poly = Polygon([(0.001, 0.0), (5.0049, -0.0001), (5.0051, 0.0), (5, 5), (0, 5)])
    text = polygon_points(poly)
    assert "-0" not in text.replace("-0.", "")  # no negative zero
    # 5.0049 and 5.0051 round to 5 and 5.01 (2 decimals); consecutive equal vertices collapse
    assert text == "0,0 5,0 5.01,0 5,5 0,5"
    for pair in text.split(" "):
        for v in pair.split(","):
            assert len(v.partition(".")[2]) <= COORD_DECIMALS


def test_polygon_points_parse_back_to_same_geometry(crop_pair):
    from bridge.nuclick.polygons import mask_to_polygon

    _, lab = crop_pair
    ids = [i for i in sorted(set(lab.ravel().tolist())) if i][:10]
    for i in ids:
        poly = mask_to_polygon(lab == i, origin=(400, 300), tolerance=0.5)
        back = points_to_polygon(polygon_points(poly))
        assert back.is_valid
        assert back.hausdorff_distance(poly) <= 0.5 * 10**-COORD_DECIMALS * 2**0.5 + 1e-9
        assert back.area == pytest.approx(poly.area, abs=0.05)


def test_polygon_points_refuses_degenerate():
    with pytest.raises(ValueError):
        polygon_points(Polygon())
    with pytest.raises(ValueError):
        polygon_points(Polygon([(0, 0), (0.001, 0), (0.002, 0.001)]))


def test_parse_points_canonical_and_legacy():
    assert parse_points("1,2 3.5,4 5,6") == [(1, 2), (3.5, 4), (5, 6)]
    assert parse_points(" 1, 2  3,4 ") == [(1, 2), (3, 4)]
    # the form older OMERO clients wrote
    legacy = "points[1,2, 3,4, 5,6] points1[1,2, 3,4, 5,6] points2[1,2, 3,4, 5,6] mask[0,0,0]"
    assert parse_points(legacy) == [(1, 2), (3, 4), (5, 6)]
    with pytest.raises(ValueError):
        parse_points("1,2 3")


def _draw_omero_polygon(points: str, shape: tuple[int, int]) -> np.ndarray:
    """The pixels OMERO.iviewer shows inside a polygon: pixel (c, r) spans [c, c+1) x [r, r+1), so it is
    inside when its centre (c + 0.5, r + 0.5) is (read straight from the "x,y x,y" text, no project code)."""
    vertices = [tuple(float(v) for v in pair.split(",")) for pair in points.split()]
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return shapely.contains_xy(Polygon(vertices), cols + 0.5, rows + 0.5)


def test_omero_points_and_polygons_land_on_the_annotated_pixels(crop_pair):
    """A Point anywhere inside a nucleus pixel (as OMERO stores it) becomes a click on that pixel, and the
    polygon string written back covers exactly the nucleus's pixels as OMERO.iviewer draws them."""
    from bridge.nuclick.polygons import mask_to_polygon

    _, lab = crop_pair
    checked = 0
    for i in [i for i in np.unique(lab) if i]:
        mask = lab == i
        if ndi.label(mask)[1] != 1 or mask.sum() < 30:
            continue  # one 4-connected piece: its outline is exact
        mask = ndi.binary_fill_holes(mask)  # OMERO polygons have no holes
        rows, cols = np.nonzero(mask)
        r, c = int(rows[len(rows) // 2]), int(cols[len(rows) // 2])
        for dx, dy in [(0.0, 0.0), (0.5, 0.5), (0.99, 0.01)]:
            point = PointRecord(shape_id=int(i), roi_id=1, x=c + dx, y=r + dy, z=None, t=3, class_name="Tumor")
            click = point.click()
            assert (math.floor(click.x), math.floor(click.y)) == (c, r)
            assert (click.id, click.class_name, point.plane) == (str(i), "Tumor", (0, 3))
        outline = mask_to_polygon(mask, tolerance=0)
        (spec,), missing = polygon_specs([point], [NucleusResult(click, True, outline, float(mask.sum()), 1.0)], "r")
        assert missing == []
        assert np.array_equal(_draw_omero_polygon(spec.points, lab.shape), mask)
        checked += 1
    assert checked >= 10


# ---------------------------------------------------------------- colours and markers


def test_pack_rgba_is_omero_signed_int():
    assert pack_rgba(255, 0, 0, 255) == -16776961  # 0xFF0000FF as a signed 32-bit int
    assert pack_rgba(0, 255, 0, 255) == 0x00FF00FF
    assert pack_rgba(0, 0, 0, 0) == 0
    for rgba in [(255, 255, 255, 255), (1, 2, 3, 4), (200, 0, 0, 128)]:
        v = pack_rgba(*rgba)
        assert -(2**31) <= v < 2**31
        assert unpack_rgba(v) == rgba
    with pytest.raises(ValueError):
        pack_rgba(256, 0, 0)


def test_class_stroke_matches_geojson_colours():
    assert unpack_rgba(class_stroke("Tumor")) == (*class_color("Tumor"), 255)
    assert unpack_rgba(class_stroke("lymphocyte")) == (*class_color("lymphocyte"), 255)
    assert unpack_rgba(class_stroke(None)) == (*DEFAULT_COLOR, 255)


def test_description_marker_round_trip():
    text = roi_description(1234, "20250101T000000Z-abc123")
    assert parse_description(text) == ("1234", "20250101T000000Z-abc123")
    for other in (None, "", "my nucleus", "nuclick-bridge nucleus", "x nuclick-bridge nucleus; point=1; run=2"):
        assert parse_description(other) is None


# ---------------------------------------------------------------- plans


def _pt(sid, x, y, z=None, t=None, cls=None, roi=None):
    return PointRecord(shape_id=sid, roi_id=roi or sid * 10, x=x, y=y, z=z, t=t, class_name=cls)


def test_plan_groups_by_plane_and_skips_done_and_invalid():
    points = [
        _pt(1, 10, 10),
        _pt(2, 20, 20, z=1, t=0),
        _pt(3, 30, 30, z=1, t=0, cls="Tumor"),
        _pt(4, 40, 40, z=0, t=1),
        _pt(5, 100, 5),  # x == width: off the image
        _pt(6, 5, 5, z=2),  # no such Z plane
        _pt(7, 5, 5, t=5),  # no such T
        _pt(8, float("nan"), 5),
        _pt(9, 50, 50),  # done earlier
    ]
    ours = [OurRoi(900, "9", "run0")]
    plan = plan_image(1, "img", 100, 60, points, ours, size_z=2, size_t=2)
    assert {k: [p.shape_id for p in v] for k, v in plan.todo.items()} == {(0, 0): [1], (1, 0): [2, 3], (0, 1): [4]}
    assert [p.shape_id for p in plan.done] == [9]
    assert [p.shape_id for p, _ in plan.invalid] == [5, 6, 7, 8]
    reasons = dict((p.shape_id, r) for p, r in plan.invalid)
    assert "outside the image (100 x 60)" in reasons[5]
    assert "Z=2" in reasons[6] and "T=5" in reasons[7] and "non-finite" in reasons[8]
    assert plan.delete == [] and plan.n_todo == 4 and plan.n_points == 9
    assert "to segment 4" in plan.describe() and "already done 1" in plan.describe()


def test_plan_replace_deletes_only_pure_ours():
    points = [_pt(1, 10, 10), _pt(2, 20, 20)]
    ours = [OurRoi(100, "1", "r", only_polygons=True), OurRoi(200, "2", "r", only_polygons=False)]
    plan = plan_image(1, "img", 64, 64, points, ours, replace=True)
    assert [r.roi_id for r in plan.delete] == [100]
    assert [r.roi_id for r in plan.kept_ours] == [200]
    assert [p.shape_id for p in plan.todo[(0, 0)]] == [1]  # 2's ROI was edited by someone: left alone
    assert [p.shape_id for p in plan.done] == [2]


def test_polygon_specs_carry_plane_class_colour_and_marker():
    pts = [_pt(1, 10.5, 10.5, z=2, t=1, cls="Tumor"), _pt(2, 30, 30)]
    square = Polygon([(8, 8), (13, 8), (13, 13), (8, 13)])
    results = [
        NucleusResult(pts[0].click(), True, square, area_px=25.0, score=0.9),
        NucleusResult(pts[1].click(), False, reason="no nucleus found at this click"),
    ]
    specs, missing = polygon_specs(pts, results, "run1")
    assert [(p.shape_id, r) for p, r in missing] == [(2, "no nucleus found at this click")]
    (s,) = specs
    assert (s.z, s.t, s.class_name) == (2, 1, "Tumor")
    assert s.points == "8,8 13,8 13,13 8,13"
    assert s.stroke == class_stroke("Tumor")
    assert parse_description(s.description) == ("1", "run1")
    kv = dict(s.key_values())
    assert kv["source_point_id"] == "1" and kv["run_id"] == "run1" and kv["class"] == "Tumor"
    assert points_to_polygon(s.points).contains(Point(10.5, 10.5))


def test_summary_line_and_dict():
    s = RunSummary(run_id="r1", images=3, images_ok=2, images_failed=1, points=10, written=7, already_done=2)
    s.not_found = 1
    line = s.line()
    assert "3 image(s): 2 ok, 1 failed" in line and "7 polygon ROI(s) written" in line and "run r1" in line
    assert json.loads(json.dumps(s.as_dict()))["written"] == 7
    d = RunSummary(run_id="r2", dry_run=True, to_segment=5)
    assert d.line().startswith("dry run: ") and "5 to segment" in d.line()


# ---------------------------------------------------------------- the command's flags


def test_cli_takes_no_password_flag(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["omero", "--host", "h", "--user", "u", "--password", "s3cret-pw", "--image", "1"])
    err = capsys.readouterr().err
    assert "never taken on the command line" in err and "s3cret-pw" not in err
    for flag in ("--pass", "--password-e"):  # no abbreviation turns into --password-env
        with pytest.raises(SystemExit):
            parser.parse_args(["omero", "--host", "h", "--user", "u", flag, "s3cret-pw", "--image", "1"])
    args = parser.parse_args(["omero", "--host", "h", "--user", "u", "--image", "1", "2", "--image", "3"])
    assert args.image == [1, 2, 3] and args.port == 4064 and args.password_env == "OMERO_PASSWORD"
    with pytest.raises(SystemExit):  # one source of images at a time
        parser.parse_args(["omero", "--host", "h", "--user", "u", "--image", "1", "--dataset", "2"])


def test_cli_missing_password_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("NB_TEST_PW", raising=False)
    code = main(["omero", "--host", "h", "--user", "u", "--password-env", "NB_TEST_PW", "--image", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "NB_TEST_PW" in err and "Traceback" not in err
    monkeypatch.delenv("NB_TEST_KEY", raising=False)
    code = main(["omero", "--host", "h", "--session-key-env", "NB_TEST_KEY", "--image", "1"])
    assert code == 2 and "NB_TEST_KEY" in capsys.readouterr().err
    # a password typed where the variable's name goes is not echoed back
    code = main(["omero", "--host", "h", "--user", "u", "--password-env", "hunter2!", "--image", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "hunter2" not in err and "named by --password-env" in err


# ---------------------------------------------------------------- leftovers, the exit status, --delete-timeout


def test_plan_finds_leftovers_of_an_interrupted_replace():
    points = [_pt(1, 10, 10), _pt(2, 20, 20), _pt(3, 30, 30)]
    ours = [
        OurRoi(100, "1", "run-a"),  # point 1: run-a's ROI, then run-b saved 300 and could not delete 100
        OurRoi(300, "1", "run-b"),
        OurRoi(200, "2", "run-a"),  # point 2: one ROI, nothing to clean
        OurRoi(150, "3", "run-a", only_polygons=False),  # point 3: an edited ROI is never a leftover ...
        OurRoi(120, "3", "run-0"),  # ... but an older polygon-only one is
        OurRoi(350, "3", "run-b"),
    ]
    plan = plan_image(1, "img", 64, 64, points, ours)
    assert [r.roi_id for r in plan.leftovers] == [100, 120]
    assert [r.roi_id for r in plan.to_delete] == [100, 120] and plan.delete == []
    assert plan.n_todo == 0 and [p.shape_id for p in plan.done] == [1, 2, 3]
    assert "leftovers of an interrupted earlier run to delete 2" in plan.describe()
    # --replace deletes every polygon-only ROI of ours anyway: no separate leftovers
    replace = plan_image(1, "img", 64, 64, points, ours, replace=True)
    assert [r.roi_id for r in replace.to_delete] == [100, 300, 200, 120, 350] and replace.leftovers == []


def test_fatal_reason_is_nothing_could_be_done():
    assert RunSummary("r").fatal_reason() == "no images to process"
    no_points = RunSummary("r", images=2, images_ok=2, images_without_points=2)
    assert no_points.fatal_reason().startswith("no Point ROIs found in 2 image(s)")
    failed = RunSummary("r", images=2, images_failed=2, errors=["x", "y"])
    assert failed.fatal_reason() == "nothing could be done: all 2 image(s) failed"
    unreadable = RunSummary("r", images=2, images_ok=1, images_failed=1, images_without_points=1)
    assert unreadable.fatal_reason() == "nothing could be done: no image with Point ROIs could be read"
    # one image with points is enough, even when nothing was written (all done earlier) or another failed
    assert RunSummary("r", images=2, images_ok=1, images_failed=1, points=3, already_done=3).fatal_reason() is None
    summary = RunSummary("r", images=1, images_ok=0, images_failed=1, points=4, written=4, not_deleted=2)
    assert "4 polygon ROI(s) written" in summary.line() and "2 left to delete on the next run" in summary.line()


def test_cli_delete_timeout(capsys):
    parser = build_parser()
    base = ["omero", "--host", "h", "--user", "u", "--image", "1"]
    assert parser.parse_args(base).delete_timeout == 60.0
    assert parser.parse_args([*base, "--delete-timeout", "2.5"]).delete_timeout == 2.5
    for bad in ("0", "-1", "nan"):
        assert main([*base, "--delete-timeout", bad]) == 2
        err = capsys.readouterr().err
        assert err.strip() == "nuclick-bridge omero: error: --delete-timeout must be a positive number of seconds"


def test_omero_tests_run_wherever_omero_py_is_installed(monkeypatch):
    import importlib.metadata

    import omero_env

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: object())
    assert omero_env.skip_reason() is None  # installed: the tests run (and a broken import fails them)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    assert "make install-omero" in omero_env.skip_reason()
    monkeypatch.setenv("CI", "true")  # CI installs it: there a missing omero-py fails the tests
    assert omero_env.skip_reason() is None
