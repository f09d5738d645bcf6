"""Evaluation against ground truth: segment every nucleus of every image from
one click each (given, or simulated as in the paper) and compute the paper's
six metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import simulate_clicks
from bridge.evaluation.datasets import LabelledImage
from bridge.evaluation.metrics import aggregate, all_metrics
from bridge.io.imageio import ArrayReader
from bridge.io.points import read_points
from bridge.nuclick.segmentation import Segmentation
from bridge.results import Click

Segmenter = Callable[[ArrayReader, list[Click]], Segmentation]


@dataclass
class EvalReport:
    summary: dict
    per_image: dict[str, dict] = field(default_factory=dict)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    clicks: dict[str, list[Click]] = field(default_factory=dict)  # with the predictions


def clicks_for(item: LabelledImage, clicks_dir: Path | None, jitter: float, rng: np.random.Generator):
    """The user's clicks for this image (``STEM.csv``) or simulated ones."""
    if clicks_dir is not None:
        p = clicks_dir / f"{item.name}.csv"
        if not p.is_file():
            raise BridgeInputError(f"no clicks file {p.name} in {clicks_dir}")
        return read_points(p)
    xy, ids = simulate_clicks(item.labels, jitter, rng)
    return [Click(float(x), float(y), id=str(i)) for (x, y), i in zip(xy, ids, strict=True)]


def evaluate(
    items: list[LabelledImage],
    segment: Segmenter,
    clicks_dir: Path | None = None,
    jitter: float = 5.0,
    seed: int = 0,
    keep_predictions: bool = False,
    progress: bool = True,
) -> EvalReport:
    """Mean of per-image metrics (the paper's protocol) and throughput."""
    rng = np.random.default_rng(seed)
    per_image: dict[str, dict] = {}
    preds: dict[str, np.ndarray] = {}
    kept_clicks: dict[str, list[Click]] = {}
    n_nuclei = 0
    seconds = 0.0
    for item in tqdm(items, desc="images", unit="img", disable=not progress):
        clicks = clicks_for(item, clicks_dir, jitter, rng)
        H, W = item.labels.shape
        t0 = time.perf_counter()
        seg = segment(ArrayReader(item.image), clicks)
        seconds += time.perf_counter() - t0
        pred = seg.instance_map(H, W)
        per_image[item.name] = all_metrics(item.labels, pred)
        n_nuclei += len(clicks)
        if keep_predictions:
            preds[item.name] = pred
            kept_clicks[item.name] = list(clicks)
    summary = aggregate(list(per_image.values()))
    summary.update(images=len(items), nuclei=n_nuclei, nuclei_per_s=round(n_nuclei / seconds, 2) if seconds else 0.0)
    return EvalReport(summary, per_image, preds, kept_clicks)
