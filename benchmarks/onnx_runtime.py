"""Is ONNX Runtime worth shipping?  Times the shipped network alone on one
batch, torch (the engine's folded, channels-last model) against ONNX Runtime
(the same folded model exported to ONNX), in fp32 on this CPU, and checks
that both give the same probabilities.

Needs ``pip install onnxruntime onnx onnxscript`` (not a dependency of the
package: the answer decides whether it becomes one).

    python benchmarks/onnx_runtime.py [--batch-size 32] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
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
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    engine = NuClickEngine.load(device="cpu", precision="fp32", batch_size=args.batch_size)
    s = engine.patch_size
    batch = np.random.default_rng(0).random((args.batch_size, 5, s, s), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        torch.onnx.export(
            engine.model,
            (torch.from_numpy(batch),),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        torch_s = best_of(lambda: engine.predict(batch), args.repeats)
        ort_s = best_of(lambda: session.run(None, {"x": batch}), args.repeats)
        p_torch = engine.predict(batch)
        p_ort = 1 / (1 + np.exp(-session.run(None, {"x": batch})[0][:, 0]))
    print(f"{engine.info.arch}, batch {args.batch_size}, {args.threads} threads, fp32")
    print(f"torch (folded, channels-last): {torch_s:.4f} s per batch")
    print(f"ONNX Runtime {ort.__version__}: {ort_s:.4f} s per batch ({torch_s / ort_s:.2f}x torch)")
    print(f"largest probability difference: {np.abs(p_torch - p_ort).max():.2e}")


if __name__ == "__main__":
    main()
