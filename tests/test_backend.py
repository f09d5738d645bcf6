"""The ONNX Runtime backend: what the commands' ``--backend auto`` picks for
fp32 on the CPU, refused in one line where it cannot run, and giving the torch
backend's nuclei on real data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import simulate_clicks
from bridge.io.imageio import ArrayReader
from bridge.model.onnxrt import resolve_backend
from bridge.nuclick.engine import NuClickEngine
from bridge.results import Click

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_auto_picks_onnxruntime_for_fp32_on_the_cpu_and_torch_elsewhere():
    assert resolve_backend("auto", CPU, "fp32") == "onnxruntime"
    assert resolve_backend("auto", CPU, "bf16") == "torch"
    assert resolve_backend("auto", CUDA, "fp32") == "torch"
    assert resolve_backend("auto", CUDA, "fp16") == "torch"
    assert resolve_backend("torch", CPU, "fp32") == "torch"
    assert resolve_backend("onnxruntime", CPU, "fp32") == "onnxruntime"
    # the library's engine keeps torch unless asked; the commands ask for auto (test_cli: their help)
    assert NuClickEngine.load(device="cpu", precision="fp32").backend == "torch"


@pytest.mark.parametrize(
    ("backend", "device", "precision", "needle"),
    [
        ("onnxruntime", CPU, "bf16", "computes in fp32, but the precision is bf16"),
        ("onnxruntime", CUDA, "fp16", "runs on the CPU"),
        ("tensorrt", CPU, "fp32", "must be one of auto, torch, onnxruntime"),
    ],
)
def test_impossible_backends_are_refused(backend, device, precision, needle):
    with pytest.raises(BridgeInputError, match=needle):
        resolve_backend(backend, device, precision)


def test_without_onnxruntime_auto_runs_torch_and_the_choice_says_what_to_install():
    """A machine where onnxruntime is not installed (an import system that refuses it)."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"  # what Python does for a module that is not there
        "import torch\n"
        "from bridge.errors import BridgeInputError\n"
        "from bridge.model.onnxrt import resolve_backend\n"
        "print(resolve_backend('auto', torch.device('cpu'), 'fp32'))\n"
        "try:\n"
        "    resolve_backend('onnxruntime', torch.device('cpu'), 'fp32')\n"
        "except BridgeInputError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["torch", "the onnxruntime backend needs onnxruntime and onnx: pip install 'nuclick-bridge[engine]'"]


def test_onnxruntime_gives_the_torch_nuclei_on_real_data(crop_pair):
    """Same weights, same fp32 arithmetic up to kernel rounding: every pixel
    that lands on the other side of the threshold had a probability within
    1e-4 of it, and every nucleus has the same polygon area to a pixel."""
    img, lab = crop_pair
    xy, _ = simulate_clicks(lab, jitter=5, seed=0)
    clicks = [Click(float(x), float(y)) for x, y in xy]
    engines = {b: NuClickEngine.load(device="cpu", precision="fp32", backend=b) for b in ("torch", "onnxruntime")}
    assert {b: e.backend for b, e in engines.items()} == {"torch": "torch", "onnxruntime": "onnxruntime"}
    patches = {b: dict(e.iter_patches(ArrayReader(img), clicks, range(len(clicks)))) for b, e in engines.items()}
    assert patches["torch"].keys() == patches["onnxruntime"].keys() and len(patches["torch"]) == len(clicks)
    threshold = engines["torch"].threshold
    for i, pt in patches["torch"].items():
        po = patches["onnxruntime"][i]
        assert np.abs(pt.prob - po.prob).max() < 1e-4
        near = np.abs(pt.prob - threshold) < 1e-4
        assert not ((pt.mask != po.mask) & ~near).any()
    segs = {b: e.segment(ArrayReader(img), clicks) for b, e in engines.items()}
    areas = {b: [r.polygon.area if r.polygon is not None else 0.0 for r in s.results] for b, s in segs.items()}
    assert sum(a > 0 for a in areas["torch"]) > 0.9 * len(clicks)
    np.testing.assert_allclose(areas["onnxruntime"], areas["torch"], atol=1.0)


def test_cli_refuses_onnxruntime_in_bf16_in_one_line(crop_pair, tmp_path, cli):
    from PIL import Image

    img, _ = crop_pair
    Image.fromarray(img).save(tmp_path / "c.png")
    (tmp_path / "c.csv").write_text("x,y\n100,100\n")
    args = ("segment", tmp_path / "c.png", "--points", tmp_path / "c.csv", "--out", tmp_path / "o.geojson")
    proc = cli(*args, "--device", "cpu", "--precision", "bf16", "--backend", "onnxruntime")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "use --precision fp32" in err[0], err
    assert not (tmp_path / "o.geojson").exists()
