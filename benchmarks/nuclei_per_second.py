"""Nuclei per second, end to end (read, patch, infer, post-process, polygons),
on one 1000x1000 image of ../shared/data with all its nuclei clicked, for the
default network width and the published one, in one run on this machine.

Random weights are fine for speed; the shipped weights are used for the
default width when they are installed.

    python benchmarks/nuclei_per_second.py [--data ../shared/data] [--device auto]
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
from bridge.model.weights import ModelInfo, default_weights_path, load_model, resolve_device
from bridge.results import Click

DEFAULT_WIDTH = 0.25
PUBLISHED_WIDTH = 1.0


def engine_for(width: float, device: torch.device, batch_size: int) -> tuple[NuClickEngine, str]:
    if width == DEFAULT_WIDTH and default_weights_path().is_file():
        model, info = load_model()
        if info.width == width:
            return NuClickEngine(model, info, device=device, batch_size=batch_size), "shipped weights"
    torch.manual_seed(0)
    model = NuClickNet(width)
    return NuClickEngine(
        model, ModelInfo("random", "bench", "", width), device=device, batch_size=batch_size
    ), "random weights"


def run_once(engine: NuClickEngine, image: Path, clicks: list[Click]) -> float:
    t0 = time.perf_counter()
    with open_image(image) as reader:
        seg = engine.segment(reader, clicks)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert len(seg.results) == len(clicks)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--image", default="TCGA-21-5786-01Z-00-DX1")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
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
    rates = {}
    for width in (DEFAULT_WIDTH, PUBLISHED_WIDTH):
        engine, source = engine_for(width, device, args.batch_size)
        run_once(engine, image, clicks[:64])  # warm-up
        best = min(run_once(engine, image, clicks) for _ in range(args.repeats))
        rates[width] = len(clicks) / best
        print(
            f"width {width:g} ({count_parameters(engine.model) / 1e6:.1f}M params, {source}): "
            f"{best:.2f} s, {rates[width]:.1f} nuclei/s"
        )
    ratio = rates[DEFAULT_WIDTH] / rates[PUBLISHED_WIDTH]
    print(f"default/published speed ratio: {ratio:.2f}x")
    print(
        json.dumps(
            {
                "nuclei": len(clicks),
                "device": str(device),
                "nuclei_per_s": {str(k): round(v, 1) for k, v in rates.items()},
                "ratio": round(ratio, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
