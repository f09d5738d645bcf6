"""``nuclick-bridge evaluate``: the accuracy yardstick."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bridge.commands.common import make_segmenter
from bridge.errors import BridgeInputError
from bridge.evaluation.datasets import LabelledImage, load_pairs, split_names
from bridge.evaluation.evaluate import EvalReport, evaluate
from bridge.evaluation.metrics import by_size
from bridge.io.geojson import atomic_write_bytes


def write_label_png(path: Path, labels: np.ndarray) -> None:
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise BridgeInputError(f"{path.name}: more than 65535 nuclei do not fit a uint16 label PNG")
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint16)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_figures(folder: Path, items: list[LabelledImage], report: EvalReport) -> list[Path]:
    """Per image ``STEM_overlay.png`` (truth, prediction, clicks) and one
    ``accuracy_by_size.png`` over every image."""
    from bridge.evaluation.figures import SIZE_PLOT_NAME, overlay_figure, size_figure

    written = []
    for it in items:
        m = report.per_image[it.name]
        title = f"{it.name}: AJI {m['aji']:.3f}, PQ {m['pq']:.3f}, {len(report.clicks[it.name])} clicks"
        pred, clicks = report.predictions[it.name], report.clicks[it.name]
        written.append(overlay_figure(folder / f"{it.name}_overlay.png", it.image, it.labels, pred, clicks, title))
    bins = by_size([(it.labels, report.predictions[it.name]) for it in items])
    n = sum(b.count for b in bins)
    title = (
        f"{len(items)} image(s), {n} annotated nuclei: AJI {report.summary['aji']:.3f}, PQ {report.summary['pq']:.3f}"
    )
    written.append(size_figure(folder / SIZE_PLOT_NAME, bins, title))
    return written


def run(args: argparse.Namespace) -> int:
    images, labels = Path(args.images), Path(args.labels)
    names = split_names(images.parent, args.split) if args.split else None
    if args.jitter < 0:
        raise BridgeInputError("--jitter must be >= 0")
    items = load_pairs(images, labels, names)
    clicks_dir = Path(args.clicks) if args.clicks else None
    if clicks_dir is not None and not clicks_dir.is_dir():
        raise BridgeInputError(f"clicks folder not found: {clicks_dir}")
    segmenter = make_segmenter(args)
    figures = Path(args.figures) if getattr(args, "figures", None) else None
    if figures is not None:
        from bridge.evaluation.figures import require_matplotlib

        require_matplotlib()  # a missing matplotlib is said before any compute
    keep = bool(args.out) or figures is not None
    report = evaluate(items, segmenter.segment, clicks_dir, args.jitter, args.seed, keep_predictions=keep)
    for name, m in report.per_image.items():
        print(f"{name}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()), file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, pred in report.predictions.items():
            write_label_png(out / f"{name}.png", pred)
    if figures is not None:
        write_figures(figures, items, report)
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.summary.items()}
    summary["images"], summary["nuclei"] = int(summary["images"]), int(summary["nuclei"])
    print(json.dumps(summary))
    return 0
