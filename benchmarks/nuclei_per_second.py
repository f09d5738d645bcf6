"""Nuclei per second, end to end (read, patch, infer, post-process, polygons),
on one 1000x1000 image of ../shared/data with all its nuclei clicked, for the
default network width and the published one, in one run on this machine.

Three runs: the shipped default (width 0.25, --precision, auto by default),
the published width in the same precision (the fair ratio), and the
published width in fp32 as the paper ran it.  Random weights are fine for
speed; the shipped weights are used for the default width.  Each run also
times the network alone on one batch, so that the end-to-end ratio can be
read against the ratio of the networks (post-processing and polygons cost
the same per nucleus for every width).

    python benchmarks/nuclei_per_second.py [--data ../shared/data] [--device auto] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bridge.clicks import simulate_clicks
from bridge.engine import NuClickEngine
from bridge.imageio import open_image
from bridge.model.network import NuClickNet, count_parameters
from bridge.model.precision import PRECISIONS
from bridge.model.weights import ModelInfo, default_weights_path, load_model, resolve_device
from bridge.results import Click

DEFAULT_WIDTH = 0.25
PUBLISHED_WIDTH = 1.0


def engine_for(width: float, device: torch.device, batch_size: int, precision: str) -> tuple[NuClickEngine, str, int]:
    """The engine, where its weights came from, and the network's parameter count (as trained,
    before the engine folds BatchNorm into the convolutions)."""
    if width == DEFAULT_WIDTH and default_weights_path().is_file():
        model, info = load_model()
        if info.width == width:
            engine = NuClickEngine(model, info, device=device, batch_size=batch_size, precision=precision)
            return engine, "shipped", count_parameters(model)
    torch.manual_seed(0)
    model = NuClickNet(width)
    info = ModelInfo("random", "bench", "", width)
    engine = NuClickEngine(model, info, device=device, batch_size=batch_size, precision=precision)
    return engine, "random weights", count_parameters(model)


def run_once(engine: NuClickEngine, image: Path, clicks: list[Click]) -> float:
    t0 = time.perf_counter()
    with open_image(image) as reader:
        seg = engine.segment(reader, clicks)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert len(seg.results) == len(clicks)
    return dt


def network_seconds(engine: NuClickEngine, repeats: int) -> float:
    """Best time of the network alone (``engine.predict``) on one batch of inputs."""
    s = engine.patch_size
    batch = np.random.default_rng(0).random((engine.batch_size, 5, s, s), dtype=np.float32)
    engine.predict(batch)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.predict(batch)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--image", default="TCGA-21-5786-01Z-00-DX1")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.data) / "monuseg"
    image = root / "images" / f"{args.image}.png"
    labels = np.asarray(Image.open(root / "labels" / f"{args.image}.png")).astype(np.int32)
    xy, _ = simulate_clicks(labels, jitter=5, seed=0)
    clicks = [Click(float(x), float(y), str(i)) for i, (x, y) in enumerate(xy)]
    device = resolve_device(args.device)
    print(
        f"image {args.image} ({labels.shape[1]}x{labels.shape[0]}), {len(clicks)} clicks, device {device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    rates, net = {}, {}
    runs = {
        "default": (DEFAULT_WIDTH, args.precision),
        "published_same_precision": (PUBLISHED_WIDTH, args.precision),
        "published_fp32": (PUBLISHED_WIDTH, "fp32"),
    }
    for key, (width, precision) in runs.items():
        engine, source, n_params = engine_for(width, device, args.batch_size, precision)
        run_once(engine, image, clicks[:64])  # warm-up
        best = min(run_once(engine, image, clicks) for _ in range(args.repeats))
        rates[key] = len(clicks) / best
        net[key] = network_seconds(engine, args.repeats)
        print(
            f"{key}: width {width:g} ({n_params / 1e6:.1f}M params, {source}), "
            f"{engine.precision}: {best:.2f} s, {rates[key]:.1f} nuclei/s; "
            f"network alone {net[key]:.3f} s per batch of {engine.batch_size}"
        )
    same = rates["default"] / rates["published_same_precision"]
    vs_fp32 = rates["default"] / rates["published_fp32"]
    net_same = net["published_same_precision"] / net["default"]
    print(f"default / published, same precision: {same:.2f}x; default / published fp32: {vs_fp32:.2f}x")
    print(f"network alone, default / published, same precision: {net_same:.2f}x")
    print(
        json.dumps(
            {
                "nuclei": len(clicks),
                "device": str(device),
                "nuclei_per_s": {k: round(v, 1) for k, v in rates.items()},
                "ratio_same_precision": round(same, 2),
                "ratio_vs_published_fp32": round(vs_fp32, 2),
                "network_s_per_batch": {k: round(v, 4) for k, v in net.items()},
                "network_ratio_same_precision": round(net_same, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
