"""The QuPath extension's plain-Java core against a real server: Java sends real
tiles of a MoNuSeg image over HTTP/JSON to a real ``nuclick-bridge`` server on
127.0.0.1 (a real engine running a real network with known behaviour) and checks
the polygons it gets back against the in-process engine's whole-image answer,
tile plan for tile plan.

A second test runs ``ModelsEndToEndTest`` against a real ``nuclick-bridge serve``
process that holds two models: the extension lists them and segments with the one
its "Model" setting names.

A third runs ``LiveEndToEndTest`` (live mode) against a real ``nuclick-bridge serve``
process with the shipped weights and a token: points added, moved and deleted one
at a time and in bursts on a whole MoNuSeg image must end in the nuclei of the
batch run for the same points (IoU >= 0.98 each); a server that goes away and a
closed port stop live mode with one message.  Its click-to-nucleus latencies are
printed (``pytest -s``), as information only.

The Java side is compiled with the machine's javac (``--release 17``) against
Debian's gson and JUnit 5 jars by ``qupath_extension/javatest.sh`` (build cached
under the git-ignored ``qupath_extension/build/``), and run with JUnit's console
launcher, selecting ``EndToEndTest``.  The test skips only when javac, java or
those jars are missing (CI installs them: ``.ci/run``).  The core's unit tests
run with ``make java-test``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shapely import affinity

from bridge.client import plan_tiles
from bridge.evaluation.clicks import simulate_clicks
from bridge.io.imageio import ArrayReader
from bridge.model.network import NuClickNet
from bridge.model.weights import load_model, save_weights
from bridge.nuclick.engine import NuClickEngine
from bridge.results import Click, NucleusResult
from bridge.service.server import NuClickServer
from support.models import TextureModel, engine_for
from support.serve import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
JAVATEST = ROOT / "qupath_extension" / "javatest.sh"
GSON_JAR = Path(os.environ.get("GSON_JAR", "/usr/share/java/gson.jar"))
JUNIT_JAR = Path(os.environ.get("JUNIT_JAR", "/usr/share/java/junit-platform-console-standalone.jar"))
TOKEN = "e2e-token-4711"
MAX_TILE = 512
SIZE = 420
PNG_ORIGIN = (5000.0, 7000.0)


def _missing_java() -> list[str]:
    missing = [tool for tool in ("javac", "java") if shutil.which(tool) is None]
    missing += [str(jar) for jar in (GSON_JAR, JUNIT_JAR) if not jar.is_file()]
    return missing


@pytest.fixture(scope="module")
def java_build() -> Path:
    missing = _missing_java()
    if missing:
        pytest.skip(
            f"no Java toolchain for the QuPath extension's core: missing {', '.join(missing)} "
            "(apt-get install default-jdk-headless libgoogle-gson-java junit5; CI installs them)"
        )
    out = subprocess.run(["bash", str(JAVATEST), "build"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"javac failed:\n{out.stdout}\n{out.stderr}"
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def server():
    srv = NuClickServer(engine_for(TextureModel(), "texture"), port=0, http_port=0, token=TOKEN).start()
    yield srv
    srv.stop(grace=1)


def _ring(ring) -> list[list[float]]:
    return [list(xy) for xy in ring.coords[:-1]]  # the wire's rings do not repeat the first point


def _shifted(r: NucleusResult, scale: float, origin: tuple[float, float] = (0.0, 0.0)) -> NucleusResult:
    """The engine's result for a tile read at downsample ``scale`` and placed at ``origin``, in level 0."""
    if r.found:
        r.polygon = affinity.affine_transform(r.polygon, [scale, 0, 0, scale, *origin])
    return r


def _expected(r: NucleusResult) -> dict:
    return {
        "found": r.found,
        "reason": r.reason,
        "exterior": _ring(r.polygon.exterior) if r.found else [],
        "holes": [_ring(h) for h in r.polygon.interiors] if r.found else [],
        "score": float(r.score) if r.found else 0.0,
    }


@pytest.fixture(scope="module")
def case(tmp_path_factory, monuseg_pair) -> tuple[Path, Path]:
    """A real 420x420 crop as PNG, one click per nucleus (plus one off the image
    and one in the far corner), Python's tile plan and the whole-image answer."""
    img, lab = monuseg_pair
    img, lab = np.ascontiguousarray(img[:SIZE, :SIZE]), lab[:SIZE, :SIZE]
    xy, _ = simulate_clicks(lab, jitter=3, seed=1)
    clicks = [Click(float(x), float(y), str(k), "Tumor" if k % 3 == 0 else None) for k, (x, y) in enumerate(xy)]
    clicks += [Click(-4.0, 30.0, str(len(clicks))), Click(415.0, 419.9, str(len(clicks) + 1), "Stroma")]
    engine = engine_for(TextureModel())
    expected = engine.segment(ArrayReader(img), clicks).results
    plans = plan_tiles(clicks, SIZE, SIZE, 128, 2.0, MAX_TILE, 1000)
    inside = [k for k, c in enumerate(clicks) if 0 <= c.x < SIZE and 0 <= c.y < SIZE]
    # The whole crop as one PNG tile placed at (5000, 7000), with the first 12 clicks on it.
    png_clicks = inside[:12]
    png_expected = [
        _shifted(r, 1.0, PNG_ORIGIN) for r in engine.segment(ArrayReader(img), [clicks[k] for k in png_clicks]).results
    ]
    # The crop said to have 0.125 um pixels: read at downsample 2 (2x2 area means, rounded down, as the
    # Java test's pixel source does), segmented there, polygons scaled back by 2.
    down = (img.reshape(SIZE // 2, 2, SIZE // 2, 2, 3).astype(np.int32).sum(axis=(1, 3)) // 4).astype(np.uint8)
    ds2_clicks = inside[:40]
    half = [Click(clicks[k].x / 2, clicks[k].y / 2, clicks[k].id, clicks[k].class_name) for k in ds2_clicks]
    # The server's simplification tolerance is in level-0 pixels (0.5): 0.25 of these pixels.
    fine = engine_for(TextureModel(), simplify_tolerance=0.25)
    ds2_expected = [_shifted(r, 2.0) for r in fine.segment(ArrayReader(down), half).results]
    tmp = tmp_path_factory.mktemp("qupath_ext")
    png = tmp / "crop.png"
    Image.fromarray(img).save(png)
    doc = {
        "maxTile": MAX_TILE,
        "clicks": [[c.x, c.y, c.class_name] for c in clicks],
        "plans": [
            {"x": p.x0, "y": p.y0, "width": p.width, "height": p.height, "members": p.members, "context": p.context}
            for p in plans
        ],
        "expected": [_expected(r) for r in expected],
        "pngTile": {"origin": list(PNG_ORIGIN), "clicks": png_clicks, "expected": [_expected(r) for r in png_expected]},
        "downsample2": {"clicks": ds2_clicks, "expected": [_expected(r) for r in ds2_expected]},
    }
    path = tmp / "case.json"
    path.write_text(json.dumps(doc))
    assert sum(r.found for r in expected) > 50 and len(plans) >= 4
    assert sum(r.found for r in png_expected) >= 10 and sum(r.found for r in ds2_expected) >= 30
    return png, path


def test_java_core_segments_real_tiles_on_a_real_server(java_build, server, case):
    png, case_file = case
    env = dict(
        os.environ,
        NUCLICK_E2E_URL=f"http://127.0.0.1:{server.http_port}",
        NUCLICK_E2E_TOKEN=TOKEN,
        NUCLICK_E2E_IMAGE=str(png),
        NUCLICK_E2E_CASE=str(case_file),
    )
    cmd = ["bash", str(JAVATEST), "test", "--select-class", "qupath.ext.nuclick.core.EndToEndTest", "--details=tree"]
    cmd += ["--disable-ansi-colors"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    tally = re.findall(r"\[\s*(\d+) tests (found|skipped|successful|failed|aborted)\s*\]", report)
    counts = {k: int(v) for v, k in tally}
    assert counts.get("skipped") == 0 and counts.get("aborted") == 0, report  # the server was really used
    assert counts.get("failed") == 0 and counts.get("successful") == counts.get("found") >= 7, report


def _run_junit(test_class: str, env: dict[str, str], at_least: int) -> str:
    cmd = ["bash", str(JAVATEST), "test", "--select-class", test_class, "--details=tree", "--disable-ansi-colors"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, **env))
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    tally = re.findall(r"\[\s*(\d+) tests (found|skipped|successful|failed|aborted)\s*\]", report)
    counts = {k: int(v) for v, k in tally}
    assert counts.get("skipped") == 0 and counts.get("aborted") == 0, report  # the server was really used
    assert counts.get("failed") == 0 and counts.get("successful") == counts.get("found") >= at_least, report
    return report


def test_java_core_lists_the_servers_models_and_segments_with_the_one_named(java_build, tmp_path, monuseg_pair):
    """A real ``serve`` process with two weights files ("default" and "other", small real networks of
    different seeds, one patch per forward pass so that answers are exact); Python's in-process answer of
    each file on the whole crop is what Java must get back when its "Model" setting names it."""
    engine_kw = {"device": "cpu", "precision": "fp32", "backend": "torch", "batch_size": 1}
    files = {}
    for name, seed, meta in [("default", 0, ("tiny-d", "d1")), ("other", 4, ("tiny-o", "o1"))]:
        torch.manual_seed(seed)
        files[name] = tmp_path / f"{name}.pt"
        save_weights(files[name], NuClickNet(0.125), {"name": meta[0], "version": meta[1], "patch_size": 64})
    img, lab = monuseg_pair
    img, lab = np.ascontiguousarray(img[:200, :200]), lab[:200, :200]
    xy, _ = simulate_clicks(lab, jitter=2, seed=3)
    clicks = [Click(float(x), float(y), str(k)) for k, (x, y) in enumerate(xy)]
    expected = {
        name: [_expected(r) for r in NuClickEngine.load(path, **engine_kw).segment(ArrayReader(img), clicks).results]
        for name, path in files.items()
    }
    models = []
    for name, path in files.items():
        info = load_model(path)[1]
        models.append(
            {"name": name, "modelName": info.name, "version": info.version, "sha256": info.sha256, "patchSize": 64}
        )
    png = tmp_path / "crop.png"
    Image.fromarray(img).save(png)
    case = tmp_path / "models_case.json"
    case.write_text(json.dumps({"models": models, "clicks": [[c.x, c.y] for c in clicks], "expected": expected}))
    flags = ("--weights", f"other={files['other']}", "--precision", "fp32", "--backend", "torch", "--max-batch", "1")
    with ServeProcess(files["default"], *flags) as srv:
        env = {"NUCLICK_MODELS_URL": f"http://{srv.http}", "NUCLICK_MODELS_IMAGE": str(png)}
        _run_junit("qupath.ext.nuclick.core.ModelsEndToEndTest", {**env, "NUCLICK_MODELS_CASE": str(case)}, 4)


def test_java_live_mode_matches_the_batch_run_on_a_real_serve(java_build, tmp_path, monuseg_pair):
    """Live mode (``LiveController``) against a real ``serve`` process with the shipped weights: one click per
    nucleus of a whole MoNuSeg image is what the Java test picks its points from."""
    img, lab = monuseg_pair
    xy, _ = simulate_clicks(lab, jitter=3, seed=2)
    clicks = [[float(x), float(y), "Tumor" if k % 3 == 0 else None] for k, (x, y) in enumerate(xy)]
    assert len(clicks) > 150
    png = tmp_path / "image.png"
    Image.fromarray(np.ascontiguousarray(img)).save(png)
    (tmp_path / "clicks.json").write_text(json.dumps(clicks))
    (tmp_path / "token.txt").write_text(TOKEN + "\n")
    weights = ROOT / "bridge" / "weights" / "nuclick_default.pt"
    with ServeProcess(weights, "--token-file", str(tmp_path / "token.txt")) as srv:
        env = {
            "NUCLICK_LIVE_URL": f"http://{srv.http}",
            "NUCLICK_LIVE_TOKEN": TOKEN,
            "NUCLICK_LIVE_IMAGE": str(png),
            "NUCLICK_LIVE_CLICKS": str(tmp_path / "clicks.json"),
        }
        report = _run_junit("qupath.ext.nuclick.core.LiveEndToEndTest", env, 5)
    for line in report.splitlines():
        if line.startswith("live "):
            print(line)  # IoU against the batch run, and latencies (information only)
