"""torch against ONNX Runtime (``--backend onnxruntime``) for the shipped
network alone, fp32, on one batch, on this CPU; and the largest probability
difference between the two.

Run it on the machine that matters: ONNX Runtime picks its kernels from the
CPU itself, so ``ONEDNN_MAX_CPU_ISA=AVX2`` (which restricts torch's oneDNN
only) does NOT show an AVX2-only CPU for this comparison.

    pip install 'nuclick-bridge[engine]'
    python benchmarks/onnx_runtime.py [--batch-size 32] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
import torch

from bridge.nuclick.engine import NuClickEngine


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32, help="patches per network batch (default: 32)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both backends (default: 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timings per backend, the best kept (default: 5)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    options = {"device": "cpu", "precision": "fp32", "batch_size": args.batch_size, "threads": args.threads}
    engines = {b: NuClickEngine.load(backend=b, **options) for b in ("torch", "onnxruntime")}
    s = engines["torch"].patch_size
    batch = np.random.default_rng(0).random((args.batch_size, 5, s, s), dtype=np.float32)
    seconds = {b: best_of(lambda e=e: e.predict(batch), args.repeats) for b, e in engines.items()}
    diff = np.abs(engines["torch"].predict(batch) - engines["onnxruntime"].predict(batch)).max()
    print(f"{engines['torch'].info.arch}, batch {args.batch_size}, {args.threads} threads, fp32")
    print(f"torch (folded, channels-last): {seconds['torch']:.4f} s per batch")
    print(
        f"ONNX Runtime {ort.__version__}: {seconds['onnxruntime']:.4f} s per batch "
        f"({seconds['torch'] / seconds['onnxruntime']:.2f}x torch)"
    )
    print(f"largest probability difference: {diff:.2e}")


if __name__ == "__main__":
    main()
