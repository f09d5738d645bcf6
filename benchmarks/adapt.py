"""Adapting to a lab's outlines, measured where the lab cannot look: prints
figures, asserts nothing.

Runs ``nuclick-bridge adapt --data DATA --split adapt`` as its own process
(wall time and peak memory of that process), then evaluates the shipped and
the adapted weights on the lab's ``test`` split and on the other datasets'
``val`` split (what the lab gives up elsewhere), with the same protocol as
``nuclick-bridge evaluate --jitter 5 --seed 0``.

    python benchmarks/adapt.py [--minutes 12] [--precision fp32] [--others monuseg,consep_tiles]
    python benchmarks/adapt.py --adapted runs/lab.pt      # evaluate a file made before
    python benchmarks/adapt.py --source qupath             # the same nuclei as a QuPath project

``--partial SHARE`` (with ``--source qupath``) makes labels partial, as in a
lab: regions cover half of each image as a 256 px checkerboard, and only
SHARE of the nuclei outside them are outlined.

``--source qupath`` gives adapt the same images and nuclei as a QuPath
project: one ``NuClick training`` region over each whole image and every
nucleus as a detection (its exact pixel outline), through the project
stand-in of the tests (QuPath itself cannot run here) and the same reader
``adapt --qupath`` uses.  The held-back nuclei differ (they are chosen by
region), so the two sources agree within that noise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bridge.evaluation.datasets import load_split
from bridge.evaluation.evaluate import evaluate
from bridge.model.precision import PRECISIONS, cpu_has_bf16
from bridge.nuclick.engine import NuClickEngine

FIGURES = ("aji", "pq", "sq", "dq")


def scores(weights: str | None, root: Path, split: str, precision: str) -> dict:
    engine = NuClickEngine.load(weights, precision=precision)
    report = evaluate(load_split(root, split), engine.segment, jitter=5.0, seed=0, progress=False)
    return {k: round(float(report.summary[k]), 4) for k in FIGURES}


def adapt_from_project(args: argparse.Namespace) -> dict:
    """``adapt --qupath`` on a project holding the lab's adapt split (in this process)."""
    import tempfile

    import numpy as np
    import shapely
    from PIL import Image
    from shapely.geometry import box, mapping

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from bridge.cli import build_parser
    from bridge.commands.adapt import adapt_and_write, config_from_args, qupath_items
    from bridge.evaluation.clicks import instance_slices
    from bridge.model.weights import load_model, resolve_device
    from support.qupath_memory import MemoryEntry, MemoryProject

    cal = {
        "pixelCalibration": {"pixelWidth": {"value": 0.25, "unit": "µm"}, "pixelHeight": {"value": 0.25, "unit": "µm"}}
    }
    tmp = Path(tempfile.mkdtemp())
    entries = []
    for item in load_split(args.data / args.lab, "adapt"):
        uri = (tmp / f"{item.name}.png").as_uri()
        Image.fromarray(item.image).save(tmp / f"{item.name}.png")
        h, w = item.labels.shape
        if args.partial is None:  # one region over the whole image
            boxes = [box(0, 0, w, h)]
        else:  # the squares of a 256 px checkerboard: half the image complete, half partly outlined
            cells = [(x, y) for y in range(0, h, 256) for x in range(0, w, 256) if (x // 256 + y // 256) % 2 == 0]
            boxes = [box(x, y, min(w, x + 256), min(h, y + 256)) for x, y in cells]
        regions = [
            {"type": "Feature", "geometry": mapping(b), "properties": {"classification": {"name": "NuClick training"}}}
            for b in boxes
        ]
        complete = shapely.union_all(boxes)
        rng = np.random.default_rng(0)
        nuclei = []
        for i, (sr, sc) in instance_slices(item.labels).items():
            rows, cols = np.nonzero(item.labels[sr, sc] == i)
            outline = shapely.union_all(
                shapely.box(cols + sc.start, rows + sr.start, cols + sc.start + 1, rows + sr.start + 1)
            )
            if not outline.intersects(complete) and rng.random() >= (args.partial or 0.0):
                continue  # outside every region and not outlined
            nuclei.append({"type": "Feature", "geometry": mapping(outline), "properties": {"objectType": "detection"}})
        entries.append(MemoryEntry(item.name, uri, annotations=regions, detections=nuclei, metadata=cal))
    project = MemoryProject(tmp / "project", entries)
    cli = ["adapt", "--qupath", str(tmp / "project"), "--out", str(args.out), "--precision", args.precision]
    cli += ["--steps", str(args.steps), "--force"] + (["--minutes", str(args.minutes)] if args.minutes else [])
    ns = build_parser().parse_args(cli)
    cfg = config_from_args(ns)
    model, info = load_model(None)
    items = qupath_items(project, ns, info.pixel_size_um)
    n = sum(len(it.targets) for it in items)
    t0 = time.perf_counter()
    adapt_and_write(ns, cfg, (model, info), items, "qupath project (benchmark)", n, resolve_device("auto"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run = {"adapt_minutes": round((time.perf_counter() - t0) / 60, 2), "peak_rss_mb": round(peak_mb)}
    print(json.dumps(run))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder of the datasets")
    ap.add_argument("--lab", default="cpm15_dev", help="the lab's dataset, with adapt and test splits (%(default)s)")
    ap.add_argument("--others", default="monuseg,consep_tiles", help="datasets whose val split is reported too")
    ap.add_argument("--minutes", type=float, default=None, help="adapt's --minutes (default: adapt's own default)")
    ap.add_argument("--steps", type=int, default=0, help="adapt's --steps (default: fill the time budget)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, help="for adapt and the evaluations")
    ap.add_argument("--out", type=Path, default=Path("runs/adapt_benchmark.pt"), help="the adapted file")
    ap.add_argument("--adapted", default=None, help="evaluate this adapted file instead of adapting")
    ap.add_argument("--source", choices=("data", "qupath"), default="data", help="how adapt gets the nuclei")
    ap.add_argument(
        "--partial",
        type=float,
        default=None,
        metavar="SHARE",
        help="with --source qupath: regions only on a 256 px checkerboard, and this share of the nuclei outside "
        "them outlined (the rest left for unknown), to measure what outlines outside regions give",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file (the card's)")
    args = ap.parse_args()
    record: dict = {"precision": args.precision, "bf16_cpu": cpu_has_bf16(), "cpus": os.cpu_count(), "rows": []}

    adapted = args.adapted
    if adapted is None and args.source == "qupath":
        record.update(adapt_from_project(args), source="qupath project")
        adapted = str(args.out)
    if adapted is None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bridge.cli", "adapt", "--data", str(args.data / args.lab), "--split", "adapt"]
        cmd += ["--out", str(args.out), "--precision", args.precision, "--steps", str(args.steps), "--force"]
        if args.minutes is not None:
            cmd += ["--minutes", str(args.minutes)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        sys.stderr.write(done.stderr[-3000:])
        if done.returncode != 0:
            raise SystemExit(f"adapt failed ({done.returncode})")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        run = {"adapt_minutes": round(wall / 60, 2), "peak_rss_mb": round(peak_mb), "steps": report["steps"]}
        print(json.dumps({**run, "threshold": report["threshold"]}))
        record.update(run, threshold=report["threshold"], nuclei=report["nuclei"], held_back=report["after"]["mean"])
        print(f"held-back before {report['before']['mean']} after {report['after']['mean']}")
        adapted = str(args.out)

    rows = [(args.lab, "test")] + [(name, "val") for name in args.others.split(",") if name]
    for name, split in rows:
        before = scores(None, args.data / name, split, args.precision)
        after = scores(adapted, args.data / name, split, args.precision)
        delta = {k: round(after[k] - before[k], 4) for k in FIGURES}
        row = {"dataset": name, "split": split, "shipped": before, "adapted": after, "delta": delta}
        print(json.dumps(row))
        record["rows"].append(row)
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
