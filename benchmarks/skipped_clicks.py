"""Accuracy when the annotator skips nuclei (prints figures; no assertions).

``evaluate`` clicks every annotated nucleus. In real use some are missed, and
an unclicked nucleus is in nobody's exclusion map, so its neighbours' masks
may run into it. This runs the same protocol as ``nuclick-bridge evaluate
--split val --jitter 5 --seed 0`` (the same simulated clicks), then leaves
each click out with chance ``--skip`` before segmenting. Unclicked nuclei count
as missed, so compare weights files with each other, not with the full-click
figures.

    python benchmarks/skipped_clicks.py [--weights FILE] [--skip 0.1] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np

from bridge.evaluation.datasets import load_split
from bridge.evaluation.evaluate import evaluate
from bridge.model.precision import PRECISIONS
from bridge.nuclick.engine import NuClickEngine
from bridge.nuclick.segmentation import Segmentation


def _skipping(engine: NuClickEngine, drop: np.random.Generator, skip: float, reader, clicks) -> Segmentation:
    """Segment with each click left out with chance ``skip``."""
    keep = drop.random(len(clicks)) >= skip
    return engine.segment(reader, [c for c, k in zip(clicks, keep, strict=True) if k])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder holding monuseg, consep_tiles")
    ap.add_argument("--datasets", default="monuseg,consep_tiles", help="comma-separated (default: %(default)s)")
    ap.add_argument("--weights", help="weights file (default: the shipped one)")
    ap.add_argument("--skip", type=float, default=0.1, help="chance that a click is left out (default: 0.1)")
    ap.add_argument("--skip-seed", type=int, default=1, help="seed of the clicks left out (default: 1)")
    ap.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="network arithmetic (default: auto, bf16 on a CPU with bf16 instructions)",
    )
    args = ap.parse_args()
    if not 0 <= args.skip < 1:
        ap.error(f"--skip must be from 0 up to, not including, 1, not {args.skip}")
    engine = NuClickEngine.load(args.weights, precision=args.precision)
    for name in args.datasets.split(","):
        segment = partial(_skipping, engine, np.random.default_rng(args.skip_seed), args.skip)
        report = evaluate(load_split(args.data / name, "val"), segment, jitter=5.0, seed=0)
        figures = {k: round(report.summary[k], 4) for k in ("aji", "pq", "sq", "dq")}
        print(json.dumps({"dataset": name, "skip": args.skip, "version": engine.info.version, **figures}))


if __name__ == "__main__":
    main()
