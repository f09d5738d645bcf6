"""`segment --server` and the OMERO.web script on a machine without torch (the install without the engine extra).

The NuClick server runs here, in the test's process (with torch), on
127.0.0.1; the client side runs in a child process that has no torch:

* by default, this interpreter under ``tests/support/no_engine.py``, whose
  import hook makes torch, onnx, onnxruntime, grpc_reflection and prometheus_client absent
  (``ModuleNotFoundError``, as for a package that is not installed):
  seconds, so it runs with every ``pytest``;
* with ``NB_CLIENT_PYTHON=.venv-client/bin/python`` (``make test-no-torch``),
  a real venv made with ``pip install -e '.[omero]'`` and no engine extra;
  the first test checks that torch really cannot be imported there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import omero_env
import pytest
from PIL import Image
from shapely.geometry import shape

from bridge.cli import ENGINE_HINT, ENGINE_MODULES
from bridge.connectors.omero.core import polygon_points
from bridge.io.imageio import ArrayReader
from bridge.io.points import read_points
from bridge.service.server import NuClickServer
from support.models import TextureModel, engine_for
from support.no_engine import ENGINE_MODULES as BLOCKED

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CLIENT_PYTHON = os.environ.get("NB_CLIENT_PYTHON")  # a real venv without the engine extra
TOLERANCE = 0.5  # segment's default --tolerance


def child(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` without torch: in the torch-free venv if given, else under the import hook."""
    hook = [sys.executable, str(TESTS / "support" / "no_engine.py")]
    cmd = [CLIENT_PYTHON, *args] if CLIENT_PYTHON else [*hook, *args]
    env = dict(os.environ, PYTHONPATH=str(TESTS), GRPC_VERBOSITY="ERROR")
    env.pop("NUCLICK_BRIDGE_TOKEN", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def nuclick():
    """A real NuClick server on 127.0.0.1 and the same network in-process, for the expected answers."""
    engine = engine_for(TextureModel(), "texture", simplify_tolerance=TOLERANCE)
    srv = NuClickServer(engine_for(TextureModel(), "texture"), port=0, http_port=None).start()
    yield f"127.0.0.1:{srv.grpc_port}", engine
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def crop_files(tmp_path_factory, monuseg_pair):
    """A real 300 x 300 crop as PNG and 10 clicks on real nuclei (CSV with classes; JSON as OMERO points)."""
    from scipy import ndimage as ndi

    img, lab = monuseg_pair
    crop, lab = np.ascontiguousarray(img[:300, :300]), lab[:300, :300]
    ids = np.unique(lab)[1:]
    com = ndi.center_of_mass(lab > 0, lab, ids)
    xy = [(c + 0.5, r + 0.5) for i, (r, c) in zip(ids, com, strict=True) if lab[int(r), int(c)] == i]
    xy = [(x, y) for x, y in xy if 20 < x < 280 and 20 < y < 280][::3][:10]
    d = tmp_path_factory.mktemp("no_torch")
    Image.fromarray(crop).save(d / "crop.png")
    rows = ["x,y,class"] + [f"{x:.2f},{y:.2f},{'Tumor' if k % 2 else 'Stroma'}" for k, (x, y) in enumerate(xy)]
    (d / "clicks.csv").write_text("\n".join(rows) + "\n")
    (d / "points.json").write_text(json.dumps([[x, y] for x, y in xy]))
    return d, crop


def test_the_child_has_no_engine(tmp_path):
    assert BLOCKED == ENGINE_MODULES  # the hook hides exactly what the CLI calls the engine extra
    omero = "import omero, bridge.connectors.omero.script\n" if CLIENT_PYTHON or not omero_env.skip_reason() else ""
    code = (
        "import importlib, json\n"
        "out = {}\n"
        f"for m in {sorted(ENGINE_MODULES)!r}:\n"
        "    try:\n"
        "        importlib.import_module(m); out[m] = 'imported'\n"
        "    except ModuleNotFoundError as e:\n"
        "        out[m] = e.name\n"
        "import grpc, bridge.client, bridge.cli\n"
        f"{omero}"
        "print(json.dumps(out))\n"
    )
    (tmp_path / "probe.py").write_text(code)
    r = child(str(tmp_path / "probe.py"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {m: m for m in ENGINE_MODULES}  # absent, named as pip would leave it


def test_segment_with_server_without_torch(nuclick, crop_files):
    address, engine = nuclick
    d, crop = crop_files
    out = d / "remote.geojson"
    args = ["-m", "bridge.cli", "segment", str(d / "crop.png"), "--points", str(d / "clicks.csv")]
    r = child(*args, "--out", str(out), "--server", address)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])

    clicks = read_points(d / "clicks.csv")
    want = [res for res in engine.segment(ArrayReader(crop), clicks).results if res.found]
    assert summary["clicks"] == 10 and summary["found"] == len(want) >= 8
    features = json.loads(out.read_text())["features"]
    assert len(features) == len(want)
    for f, res in zip(features, want, strict=True):  # the same nuclei as the engine in-process
        got = shape(f["geometry"]).normalize()  # GeoJSON's ring order, the same vertices
        assert got.equals_exact(res.polygon.normalize(), tolerance=1e-6)
        assert f["properties"]["classification"]["name"] == res.click.class_name

    # what needs the engine says so in one line, and exits 2
    r = child(*args, "--out", str(d / "local.geojson"))
    assert r.returncode == 2 and not (d / "local.geojson").exists()
    assert r.stderr.strip() == f"nuclick-bridge segment: error: {ENGINE_HINT} (no module 'torch')"


def test_serve_without_the_engine_says_what_to_install():
    r = child("-m", "bridge.cli", "serve", "--port", "0")  # its JSON log may wrap the line
    assert r.returncode == 2 and f"nuclick-bridge serve: error: {ENGINE_HINT}" in r.stderr, r.stderr


@pytest.mark.skipif(not CLIENT_PYTHON and omero_env.skip_reason() is not None, reason=str(omero_env.skip_reason()))
def test_omero_script_without_torch(nuclick, crop_files):
    address, _ = nuclick
    d, crop = crop_files
    job = TESTS / "support" / "omero_script_job.py"
    shell = ROOT / "omero_scripts" / "nuclick_bridge" / "NuClick_Segment_Nuclei.py"
    r = child(str(job), str(d / "crop.png"), str(d / "points.json"), address, str(shell))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["engine_modules"] == []

    ids = sorted(got["clicks"], key=int)
    from bridge.results import Click

    clicks = [Click(*got["clicks"][i], id=i) for i in ids]
    results = engine_for(TextureModel()).segment(ArrayReader(crop), clicks).results
    want = {c.id: polygon_points(res.polygon) for c, res in zip(clicks, results, strict=True) if res.found}
    assert got["ours"] == want and len(want) >= 8
    assert got["message"].startswith(f"1 image(s): 1 ok, 0 failed; 10 point(s): {len(want)} polygon ROI(s) written")
    rows = got["csv"].strip().splitlines()
    assert rows[0].startswith("image_id,image_name,status,points,") and rows[1].startswith("1,slide,ok,10,")
