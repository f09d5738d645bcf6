"""`--model fast|accurate`: the shipped three-view file run whole, or its
whole-patch view alone, through the engine, the CLI and the server."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from bridge.cli import build_parser, main
from bridge.commands.serve import build_server
from bridge.model.network import NuClickNet
from bridge.model.weights import load_model, save_weights
from bridge.nuclick.engine import NuClickEngine


def _patches(crop_pair) -> np.ndarray:
    img, _ = crop_pair
    x = np.zeros((2, 5, 128, 128), np.float32)
    for b, (y0, x0) in enumerate(((0, 0), (100, 60))):
        x[b, :3] = img[y0 : y0 + 128, x0 : x0 + 128].transpose(2, 0, 1) / 255.0
    yy, xx = np.mgrid[:128, :128]
    x[:, 3] = np.exp(-((yy - 64.0) ** 2 + (xx - 64.0) ** 2) / 8.0)
    return x


def test_fast_is_the_whole_patch_view_of_the_shipped_file_alone(crop_pair):
    joined, info = load_model()
    assert info.arch == "effunet-lite0-3scale"
    x = _patches(crop_pair)
    fast = NuClickEngine.load(device="cpu", precision="fp32", model="fast")
    accurate = NuClickEngine.load(device="cpu", precision="fp32")
    assert fast.info.arch == "effunet-lite0" and fast.info.extra["model"] == "fast"
    assert fast.info.version == info.version and fast.patch_size == 128
    with torch.no_grad():
        wide = torch.sigmoid(joined.wide(torch.from_numpy(x)))[:, 0].numpy()
    pf, pa = fast.predict(x), accurate.predict(x)
    assert np.abs(pf - wide).max() < 1e-4
    # the magnified views change the centre half only, and there they change outlines
    assert np.abs(pa[:, :32] - pf[:, :32]).max() < 1e-4
    assert ((pa[:, 32:96, 32:96] > 0.4) != (pf[:, 32:96, 32:96] > 0.4)).sum() > 10


def test_cli_evaluates_with_either_model_and_refuses_fast_for_a_single_network(data_root, tmp_path, capsys):
    name = "TCGA-21-5786-01Z-00-DX1"
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
        shutil.copy(data_root / "monuseg" / sub / f"{name}.png", tmp_path / sub)
    base = ["evaluate", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels")]
    base += ["--jitter", "5", "--seed", "0", "--device", "cpu"]
    scores = {}
    for choice in ("accurate", "fast"):
        assert main([*base, "--model", choice]) == 0
        scores[choice] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["fast"]["nuclei"] == scores["accurate"]["nuclei"] == 440
    assert scores["fast"]["aji"] != scores["accurate"]["aji"] and scores["fast"]["aji"] > 0.6
    save_weights(tmp_path / "tiny.pt", NuClickNet(0.125), {"name": "tiny"})
    assert main([*base, "--weights", str(tmp_path / "tiny.pt"), "--model", "fast"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "tiny.pt holds one network (nuclick-w0.125)" in err[0] and "joined views" in err[0]


def test_fast_on_a_server_is_a_server_flag(tmp_path, crop_pair, capsys):
    from PIL import Image

    Image.fromarray(crop_pair[0]).save(tmp_path / "crop.png")
    (tmp_path / "clicks.csv").write_text("x,y\n50,50\n")
    argv = ["segment", str(tmp_path / "crop.png"), "--points", str(tmp_path / "clicks.csv")]
    argv += ["--out", str(tmp_path / "out.geojson")]
    assert main([*argv, "--server", "127.0.0.1:1", "--model", "fast"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "start the server with serve --model fast" in err[0]
    assert not (tmp_path / "out.geojson").exists()
    args = build_parser().parse_args(["serve", "--port", "0", "--http-port", "0", "--device", "cpu", "--model", "fast"])
    server = build_server(args)
    assert server.engine.info.arch == "effunet-lite0" and server.engine.patch_size == 128
