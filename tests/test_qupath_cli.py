"""``nuclick-bridge qupath`` / ``qupath-export`` at the command line, up to the
point where paquo would start QuPath: flags, a light import, and paths that
are not projects."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tifffile

from bridge.cli import build_parser, main
from bridge.commands.qupath import export_from, run_on
from bridge.connectors.qupath.paquo import project_file
from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import simulate_clicks
from support.qupath_memory import MemoryEntry, MemoryProject


def test_importing_the_command_loads_neither_paquo_nor_torch():
    code = (
        "import sys, bridge.commands.qupath, bridge.connectors.qupath.paquo;"
        "print(sorted(m for m in ('paquo', 'torch', 'jpype') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_flags():
    args = build_parser().parse_args(
        ["qupath", "proj", "--image", "a.svs", "--image", "b.svs", "--class", "Tumor", "--replace", "--dry-run"]
    )
    assert (args.project, args.image, args.classes, args.replace, args.dry_run) == (
        "proj",
        ["a.svs", "b.svs"],
        ["Tumor"],
        True,
        True,
    )
    assert args.server is None and args.method == "nuclick"
    args = build_parser().parse_args(["qupath", "proj", "--server", "gpu-box:50051", "--method", "watershed"])
    assert args.server == "gpu-box:50051" and args.image == [] and not args.replace
    args = build_parser().parse_args(["qupath-export", "proj", "--image", "a.svs", "--out", "a.geojson"])
    assert (args.image, args.out, args.run) == ("a.svs", "a.geojson", None)


@pytest.fixture
def fake_project(tmp_path):
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "project.qpproj").write_text(json.dumps({"version": "0.6.0", "images": []}))
    return folder


def test_project_paths(tmp_path, fake_project):
    assert project_file(fake_project) == fake_project / "project.qpproj"
    assert project_file(fake_project / "project.qpproj") == fake_project / "project.qpproj"
    (tmp_path / "notes.txt").write_text("{}")
    (tmp_path / "broken" / "x").mkdir(parents=True)
    (tmp_path / "broken" / "project.qpproj").write_text("not json")
    (tmp_path / "other.qpproj").write_text(json.dumps({"hello": 1}))
    cases = {
        tmp_path / "nowhere": "QuPath project not found",
        tmp_path / "broken" / "x": "has no project.qpproj",
        tmp_path / "notes.txt": "give project.qpproj or the project folder",
        tmp_path / "broken": "not a readable QuPath project file",
        tmp_path / "other.qpproj": "not a QuPath project file",
    }
    for path, message in cases.items():
        with pytest.raises(BridgeInputError, match=message):
            project_file(path)


def test_not_a_project_exits_2_with_one_line(tmp_path, capsys):
    for command in (["qupath", str(tmp_path)], ["qupath-export", str(tmp_path), "--image", "a", "--out", "x.geojson"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        expected = f"{tmp_path} is not a QuPath project: it has no project.qpproj"
        assert err == f"nuclick-bridge {command[0]}: error: {expected}"


def test_bad_flags_are_refused_before_paquo(fake_project, tmp_path, capsys):
    assert main(["qupath", str(fake_project), "--server", "no-port"]) == 2
    assert "--server must be HOST:PORT" in capsys.readouterr().err
    assert main(["qupath", str(fake_project), "--tolerance", "-1"]) == 2
    assert "--tolerance must be >= 0" in capsys.readouterr().err
    out = tmp_path / "missing" / "a.geojson"
    assert main(["qupath-export", str(fake_project), "--image", "a", "--out", str(out)]) == 2
    assert "output folder does not exist" in capsys.readouterr().err


NEED_PAQUO = (
    "nuclick-bridge qupath: error: the qupath commands need paquo: "
    "pip install 'nuclick-bridge[qupath]' (and QuPath 0.6)"
)


def _qupath_in_a_fresh_process(project, env: dict, block_paquo: bool = False) -> str:
    """The last stderr line of ``qupath --dry-run`` in a fresh interpreter (paquo
    starts Java at most once per process); ``block_paquo`` makes ``import paquo`` fail."""
    code = "import sys\n"
    if block_paquo:
        code += "sys.modules['paquo'] = None\n"
    code += f"from bridge.cli import main\nsys.exit(main(['qupath', {str(project)!r}, '--dry-run']))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_without_paquo_the_error_says_what_to_install(fake_project):
    assert _qupath_in_a_fresh_process(fake_project, dict(os.environ), block_paquo=True) == NEED_PAQUO


def test_without_a_usable_qupath_the_error_says_what_to_set(fake_project, tmp_path):
    """paquo installed, but no QuPath where PAQUO_QUPATH_DIR points: say what to set."""
    pytest.importorskip("paquo", reason="needs paquo (pip install '.[qupath]'); without it see the test above")
    env = {**os.environ, "PAQUO_QUPATH_DIR": str(tmp_path / "no-qupath-here")}
    err = _qupath_in_a_fresh_process(fake_project, env)
    assert err.startswith("nuclick-bridge qupath: error: paquo could not start QuPath ("), err
    assert err.endswith(
        "; set PAQUO_QUPATH_DIR to your QuPath 0.6 folder (the one containing lib/app and lib/runtime)"
    ), err


def test_command_on_a_project_and_export_match_segment(crop_pair, tmp_path, capsys):
    """``qupath`` then ``qupath-export`` on an in-memory project give the
    nuclei, classes and GeoJSON layout that ``segment`` gives for the same points."""
    img, lab = crop_pair
    tif = tmp_path / "crop.tif"
    tifffile.imwrite(tif, img, tile=(128, 128), photometric="rgb", compression="zlib")
    xy, _ = simulate_clicks(lab, jitter=3, seed=5)
    classes = ["Tumor" if k % 2 else "Stroma" for k in range(len(xy))]
    labelled = list(zip(xy.tolist(), classes, strict=True))
    annotations = [
        {
            "type": "Feature",
            "geometry": {"type": "MultiPoint", "coordinates": [p for p, c in labelled if c == cls]},
            "properties": {"objectType": "annotation", "classification": {"name": cls}},
        }
        for cls in ("Tumor", "Stroma")
    ]
    entry = MemoryEntry("crop.tif", tif.as_uri(), annotations)
    project = MemoryProject(tmp_path, [entry])

    args = build_parser().parse_args(["qupath", str(tmp_path), "--method", "watershed"])
    assert run_on(project, args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["points"] == len(xy) and summary["detections"] == len(entry.detections) > 0
    assert "images (0 failed)" in captured.err.strip().splitlines()[-1]

    out = tmp_path / "exported.geojson"
    args = build_parser().parse_args(["qupath-export", str(tmp_path), "--image", "crop.tif", "--out", str(out)])
    assert export_from(project, args) == 0
    exported = json.loads(out.read_text())["features"]

    points = tmp_path / "points.csv"
    points.write_text("x,y,class\n" + "".join(f"{x!r},{y!r},{c}\n" for (x, y), c in labelled))
    reference = tmp_path / "segment.geojson"
    assert main(["segment", str(tif), "--points", str(points), "--out", str(reference), "--method", "watershed"]) == 0
    expected = json.loads(reference.read_text())["features"]

    def by_geometry(features):
        return {json.dumps(f["geometry"]): f["properties"] for f in features}

    got, want = by_geometry(exported), by_geometry(expected)
    assert got.keys() == want.keys()
    for geometry, props in want.items():
        mine = got[geometry]
        assert mine["objectType"] == props["objectType"] == "detection"
        assert mine["classification"] == props["classification"]
        assert mine["measurements"] == props["measurements"]
        assert set(props) <= set(mine)  # the same layout, plus the marker name

    # nothing to do is fine; no points at all is not
    capsys.readouterr()
    args = build_parser().parse_args(["qupath", str(tmp_path), "--method", "watershed"])
    assert run_on(project, args) == 0
    empty = MemoryProject(tmp_path, [MemoryEntry("empty.tif", tif.as_uri())])
    with pytest.raises(BridgeInputError, match="no point annotations found"):
        run_on(empty, args)

    # every point deleted: reported and kept without --replace (exit 2), removed with it (exit 0)
    entry.annotations = []
    entry.save()
    capsys.readouterr()
    with pytest.raises(
        BridgeInputError, match=r"nuclei of ours lost their points \(run with --replace to remove them\)"
    ):
        run_on(project, args)
    kept = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (kept["orphans"], kept["removed"]) == (summary["detections"], 0) and len(entry.detections) > 0
    args = build_parser().parse_args(["qupath", str(tmp_path), "--method", "watershed", "--replace"])
    assert run_on(project, args) == 0
    cleaned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cleaned["removed"] == cleaned["orphans"] == summary["detections"] and entry.detections == []
