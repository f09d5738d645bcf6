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
from bridge.evaluation.datasets import load_pairs, split_names
from bridge.evaluation.evaluate import evaluate
from bridge.io.geojson import atomic_write_bytes


def write_label_png(path: Path, labels: np.ndarray) -> None:
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise BridgeInputError(f"{path.name}: more than 65535 nuclei do not fit a uint16 label PNG")
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint16)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


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
    report = evaluate(items, segmenter.segment, clicks_dir, args.jitter, args.seed, keep_predictions=bool(args.out))
    for name, m in report.per_image.items():
        print(f"{name}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()), file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, pred in report.predictions.items():
            write_label_png(out / f"{name}.png", pred)
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.summary.items()}
    summary["images"], summary["nuclei"] = int(summary["images"]), int(summary["nuclei"])
    print(json.dumps(summary))
    return 0
