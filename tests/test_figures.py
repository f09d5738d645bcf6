"""``evaluate --figures DIR`` on a real MoNuSeg crop with the shipped network:
the pictures are written, and they show what the run measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bridge.evaluation.clicks import simulate_clicks
from bridge.evaluation.figures import PRED_RGB, SIZE_PLOT_NAME, TRUTH_RGB, outline_rgb
from bridge.evaluation.metrics import by_size

pytest.importorskip("matplotlib")


@pytest.fixture
def crop_dataset(tmp_path, crop_pair):
    """One real 256x256 validation crop laid out as evaluate reads it."""
    img, lab = crop_pair
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    Image.fromarray(img).save(tmp_path / "images" / "crop.png")
    Image.fromarray(lab.astype(np.uint16)).save(tmp_path / "labels" / "crop.png")
    return tmp_path


def _colour_count(rgb: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(rgb[..., :3] == colour, axis=-1).sum())


def test_outlines_are_the_truth_and_prediction_edges(crop_pair):
    img, lab = crop_pair
    pred = np.zeros_like(lab)
    pred[lab == lab.max()] = 1  # one nucleus predicted exactly, the rest missed
    out = outline_rgb(img, lab, pred)
    assert out.shape == img.shape and out.dtype == np.uint8
    yellow = np.all(out == PRED_RGB, axis=-1)
    assert yellow.any() and np.all(lab[yellow] == lab.max()), "prediction edges lie on the predicted nucleus"
    green = np.all(out == TRUTH_RGB, axis=-1)
    assert len(np.unique(lab[green])) == len(np.unique(lab)) - 2, "every other nucleus is outlined in green"
    assert np.array_equal(out[(lab == 0)], img[(lab == 0)]), "background pixels are untouched"


def test_evaluate_figures_on_a_real_crop(crop_dataset, cli, crop_pair):
    d = crop_dataset
    figs = d / "figures"
    res = cli(
        "evaluate", "--images", d / "images", "--labels", d / "labels", "--jitter", "5", "--seed", "0",
        "--precision", "fp32", "--figures", figs, "--out", d / "pred",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["aji"] > 0.6, summary  # the shipped network on a real crop
    assert sorted(p.name for p in figs.iterdir()) == [SIZE_PLOT_NAME, "crop_overlay.png"]

    overlay = np.asarray(Image.open(figs / "crop_overlay.png").convert("RGB"))
    img, lab = crop_pair
    assert overlay.shape[1] == 2 * img.shape[1] and overlay.shape[0] >= 2 * img.shape[0], overlay.shape
    # the picture holds the drawn outlines, each image pixel as 2x2 screen pixels (less what the crosses cover)
    pred = np.asarray(Image.open(d / "pred" / "crop.png")).astype(np.int32)
    drawn = outline_rgb(img, lab, pred)
    for colour in (TRUTH_RGB, PRED_RGB):
        want = 4 * _colour_count(drawn, colour)
        got = _colour_count(overlay, colour)
        assert 0.8 * want <= got <= want + 200, (colour, got, want)  # + the legend's line samples
    cyan = np.all(np.abs(overlay.astype(int) - (0, 229, 255)) < 40, axis=-1).sum()
    n_clicks = len(simulate_clicks(lab)[0])
    assert cyan >= 5 * n_clicks, (cyan, n_clicks)  # a cross at every click

    plot = np.asarray(Image.open(figs / SIZE_PLOT_NAME).convert("RGB"))
    assert plot.shape == (360, 640, 3)
    bins = [b for b in by_size([(lab, pred)]) if b.count]
    assert len(bins) >= 3  # a real crop has nuclei of several sizes
    blue = np.all(plot == (0x4C, 0x72, 0xB0), axis=-1)
    cols = blue.sum(axis=0) > 15  # bar columns (the legend's blue patch is shorter)
    runs = np.count_nonzero(np.diff(cols.astype(int)) == 1) + int(cols[0])
    assert runs == len(bins), (runs, len(bins))  # one bar per size bin that has nuclei
