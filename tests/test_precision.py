"""Half-precision inference: chosen per hardware, refused where it cannot
run, and giving the same nuclei as fp32 with the shipped weights on real
data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import simulate_clicks
from bridge.evaluation.metrics import all_metrics
from bridge.io.imageio import ArrayReader
from bridge.model.precision import cpu_has_bf16, resolve_precision
from bridge.nuclick.engine import NuClickEngine
from bridge.results import Click

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def _cpuinfo_flags() -> set[str] | None:
    """The CPU's feature flags as the Linux kernel reports them (None elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


@pytest.mark.skipif(_cpuinfo_flags() is None, reason="needs Linux's /proc/cpuinfo to know the CPU's flags")
def test_bf16_is_detected_from_the_cpus_own_flags():
    """oneDNN's bf16 check agrees with the kernel's view of the CPU: AVX512-BF16
    or AMX-BF16 present means bf16, neither means fp32 (what `grep -w avx512_bf16
    /proc/cpuinfo` tells a lab's IT person)."""
    flags = _cpuinfo_flags()
    assert cpu_has_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert resolve_precision("auto", CPU) == ("bf16" if {"avx512_bf16", "amx_bf16"} & flags else "fp32")


def test_auto_follows_the_hardware():
    assert resolve_precision("auto", CUDA) == "fp16"
    assert resolve_precision("auto", CUDA, training=True) == "bf16"  # no loss scaling needed
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"


@pytest.mark.parametrize(
    ("precision", "device", "training", "needle"),
    [
        ("fp16", CPU, False, "needs a CUDA GPU"),
        ("fp16", CUDA, True, "loss scaling"),
        ("half", CPU, False, "must be one of"),
    ],
)
def test_impossible_precisions_are_refused(precision, device, training, needle):
    with pytest.raises(BridgeInputError, match=needle):
        resolve_precision(precision, device, training=training)


def test_bf16_gives_the_fp32_nuclei_on_real_data(crop_pair):
    """bf16 may move a boundary pixel, never a nucleus: per-object agreement
    between the two precisions is far above any accuracy difference we report."""
    img, lab = crop_pair
    xy, _ = simulate_clicks(lab, jitter=5, seed=0)
    clicks = [Click(float(x), float(y)) for x, y in xy]
    maps = {}
    for precision in ("fp32", "bf16"):
        engine = NuClickEngine.load(device="cpu", precision=precision)
        assert engine.precision == precision
        seg = engine.segment(ArrayReader(img), clicks)
        assert len(seg.results) == len(clicks)
        maps[precision] = seg.instance_map(*lab.shape)
    agreement = all_metrics(maps["fp32"], maps["bf16"])
    assert agreement["dq"] > 0.97 and agreement["sq"] > 0.93, agreement
    gt = {p: all_metrics(lab, m)["aji"] for p, m in maps.items()}
    assert abs(gt["fp32"] - gt["bf16"]) < 0.02, gt
    assert np.count_nonzero(maps["bf16"]) > 0


def test_cli_refuses_fp16_on_cpu_in_one_line(crop_pair, tmp_path, cli):
    from PIL import Image

    img, _ = crop_pair
    Image.fromarray(img).save(tmp_path / "c.png")
    (tmp_path / "c.csv").write_text("x,y\n100,100\n")
    proc = cli(
        "segment",
        tmp_path / "c.png",
        "--points",
        tmp_path / "c.csv",
        "--out",
        tmp_path / "o.geojson",
        "--device",
        "cpu",
        "--precision",
        "fp16",
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "fp16 needs a CUDA GPU" in err[0], err
    assert not (tmp_path / "o.geojson").exists()


def test_tta_views_are_symmetries_that_undo_exactly():
    from bridge.nuclick.engine import TTA_VIEWS

    x = torch.rand(2, 5, 16, 16)
    outs = []
    for view, undo in TTA_VIEWS[8]:
        assert torch.equal(undo(view(x)), x)
        outs.append(view(x))
    assert len({o.numpy().tobytes() for o in outs}) == 8, "eight different views"


def test_tta_averages_views_of_the_real_model(crop_pair):
    """With 8 views the probabilities are the mean over the views; every
    nucleus is still found and sits where the single view put it."""
    img, lab = crop_pair
    xy, _ = simulate_clicks(lab, jitter=5, seed=0)
    clicks = [Click(float(x), float(y)) for x, y in xy]
    one = NuClickEngine.load(device="cpu", precision="fp32")
    eight = NuClickEngine.load(device="cpu", precision="fp32", tta=8)
    from bridge.nuclick.engine import TTA_VIEWS

    batch = torch.rand(2, 5, 128, 128)
    per_view = [one.predict(np.ascontiguousarray(view(batch).numpy())) for view, _ in TTA_VIEWS[8]]
    expected = np.mean(
        [undo(torch.from_numpy(p)[:, None])[:, 0].numpy() for p, (_, undo) in zip(per_view, TTA_VIEWS[8], strict=True)],
        axis=0,
    )
    np.testing.assert_allclose(eight.predict(batch.numpy()), expected, atol=1e-5)
    maps = {e.tta: e.segment(ArrayReader(img), clicks).instance_map(*lab.shape) for e in (one, eight)}
    agreement = all_metrics(maps[1], maps[8])
    assert agreement["dq"] > 0.95 and agreement["sq"] > 0.85, agreement
    with pytest.raises(BridgeInputError, match="1, 2, 4 or 8"):
        NuClickEngine.load(device="cpu", tta=3)
