"""Nuclei per second, end to end (read, patch, infer, post-process, polygons),
on one 1000x1000 image of ../shared/data with all its nuclei clicked, for the
shipped network and the comparison networks, in one run on this machine.

Rows: the shipped default (``--precision``, auto by default, and fp32, which
is what a CPU without bf16 instructions runs), each ``--compare`` network in
the same two precisions, and the published NuClick width (``nuclick-w1``), the
ratio's reference (run by torch).  fp32 rows are timed on torch and, when it
is installed, on ONNX Runtime (``--backend onnxruntime``), so a lab sees which
is faster on its own CPU.  Random weights are fine for speed; the shipped weights
are used for the default.  Each row also times the network alone on one
batch, so the end-to-end rate can be read against the network's cost
(reading, post-processing and polygons cost the same per nucleus for every
network), and gives its GFLOP per patch.

Compare speeds only within one run: the machine's speed drifts between runs.
To see a CPU without AVX-512 on one that has it, run under
``ONEDNN_MAX_CPU_ISA=AVX2``.

    python benchmarks/nuclei_per_second.py [--data ../shared/data] [--compare nuclick-w0.25,effunet-lite1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from bridge.evaluation.clicks import simulate_clicks
from bridge.io.imageio import open_image
from bridge.model.architectures import build, from_label
from bridge.model.network import count_parameters
from bridge.model.onnxrt import onnxruntime_available
from bridge.model.precision import PRECISIONS
from bridge.model.weights import ModelInfo, default_weights_path, load_model, resolve_device
from bridge.nuclick.engine import NuClickEngine
from bridge.results import Click

PUBLISHED = "nuclick-w1"


def engine_for(
    label: str, device: torch.device, batch_size: int, precision: str, backend: str
) -> tuple[NuClickEngine, str, int]:
    """The engine, where its weights came from, and the network's parameter count (as trained,
    before the engine folds BatchNorm into the convolutions)."""
    if label == "default":
        if not default_weights_path().is_file():
            raise SystemExit("no shipped weights in this install")
        model, info = load_model()
        return (
            NuClickEngine(model, info, device=device, batch_size=batch_size, precision=precision, backend=backend),
            "shipped",
            (count_parameters(model)),
        )
    if label.endswith(".pt"):  # a trained weights file, e.g. one trained on another patch size
        model, info = load_model(label)
        engine = NuClickEngine(model, info, device=device, batch_size=batch_size, precision=precision, backend=backend)
        return engine, f"weights {Path(label).name}", count_parameters(model)
    torch.manual_seed(0)
    spec = from_label(label)
    model = build(spec)
    info = ModelInfo("random", "bench", "", spec.width, arch=spec.label)
    engine = NuClickEngine(model, info, device=device, batch_size=batch_size, precision=precision, backend=backend)
    return engine, "random weights", count_parameters(model)


def gflop_per_patch(engine: NuClickEngine) -> float:
    """Forward GFLOP (multiply and add counted separately) for one patch."""
    s = engine.patch_size
    x = torch.zeros(1, 5, s, s, device=engine.device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        engine.model(x)
    return counter.get_total_flops() / 1e9


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
    ap.add_argument(
        "--data",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
        help="the shared data folder; the image is read from its monuseg/ (default: ../shared/data)",
    )
    ap.add_argument(
        "--image",
        default="TCGA-21-5786-01Z-00-DX1",
        help="monuseg image to segment, every labelled nucleus clicked (default: %(default)s, 440 nuclei)",
    )
    ap.add_argument("--device", default="auto", help="auto (a CUDA GPU when torch sees one), cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=32, help="patches per network batch (default: 32)")
    ap.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="each network is timed in this precision and in fp32 (default: auto, bf16 on a CPU with bf16 "
        "instructions)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timings per row, the best kept (default: 2; 1 for a quick look)",
    )
    ap.add_argument(
        "--backends",
        default="torch,onnxruntime",
        help="what runs the fp32 rows (bf16 and fp16 run on torch only); default: both, when onnxruntime is installed",
    )
    ap.add_argument(
        "--compare",
        default="nuclick-w0.25",
        help="comma-separated architectures (random weights) or weights files (*.pt, with their own patch "
        "size) to time beside the default, e.g. nuclick-w0.25,effunet-lite1,runs/ft96/ft_96.pt "
        "(the published nuclick-w1 is always timed)",
    )
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
    labels_to_run = ["default", *[c for c in args.compare.split(",") if c], PUBLISHED]
    precisions = list(dict.fromkeys([args.precision, "fp32"]))
    backends = [b for b in args.backends.split(",") if b and (b != "onnxruntime" or onnxruntime_available())]
    rows = {}
    gflop = {}
    for label in labels_to_run:
        for precision, backend in [(p, b) for p in precisions for b in backends]:
            if backend == "onnxruntime" and (precision != "fp32" or device.type != "cpu"):
                continue
            engine, source, n_params = engine_for(label, device, args.batch_size, precision, backend)
            name = Path(label).stem if label.endswith(".pt") else label
            key = f"{name}/{engine.precision}/{engine.backend}"
            if key in rows:  # auto resolved to fp32 here
                continue
            if engine.backend == "torch":
                gflop[name] = gflop_per_patch(engine)
            run_once(engine, image, clicks[:64])  # warm-up
            best = min(run_once(engine, image, clicks) for _ in range(args.repeats))
            rows[key] = {
                "arch": engine.info.arch,
                "source": source,
                "params_m": round(n_params / 1e6, 2),
                "gflop_per_patch": round(gflop.get(name, float("nan")), 3),
                "nuclei_per_s": round(len(clicks) / best, 1),
                "network_s_per_batch": round(network_seconds(engine, args.repeats), 4),
            }
            r = rows[key]
            print(
                f"{key}: {r['arch']} ({r['params_m']}M params, {source}, patch {engine.patch_size}, "
                f"{r['gflop_per_patch']} GFLOP/patch): "
                f"{best:.2f} s, {r['nuclei_per_s']} nuclei/s; network alone {r['network_s_per_batch']:.3f} s "
                f"per batch of {engine.batch_size}",
                flush=True,
            )
    ratios = {}
    for key, r in rows.items():
        label, prec, backend = key.split("/")
        ref = rows.get(f"{PUBLISHED}/{prec}/torch")
        if label != PUBLISHED and ref:
            ratios[key] = round(r["nuclei_per_s"] / ref["nuclei_per_s"], 2)
            print(f"{key} / published ({prec}, torch): {ratios[key]:.2f}x")
    print(json.dumps({"nuclei": len(clicks), "device": str(device), "rows": rows, "ratio_vs_published": ratios}))


if __name__ == "__main__":
    main()
