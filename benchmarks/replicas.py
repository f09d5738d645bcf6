"""Nuclei per second with 1, 2 and 3 ``nuclick-bridge serve`` replicas on this
machine, and the time a run loses when one replica is SIGKILLed in the middle.

    python benchmarks/replicas.py [--data ../shared/data] [--replicas 1,2,3] [--clicks 0] [--weights FILE]

Real replicas (child processes on 127.0.0.1, the shipped weights unless
``--weights``), a real MoNuSeg validation image with one click per nucleus,
and the real client: ``segment_tiled`` over a ``HOST:PORT,...`` target with
``--concurrency`` tiles in flight (default: 2 per replica).  Replicas share this
machine's cores (each gets ``cores / replicas`` torch threads), so on a CPU-only
box more replicas cannot go faster than the cores allow; on a machine with one
GPU per replica they scale with the GPUs.  Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # support.serve: the test suite's child-process server

from bridge.client import NuClickClient  # noqa: E402
from bridge.evaluation.clicks import simulate_clicks  # noqa: E402
from bridge.io.imageio import ArrayReader  # noqa: E402
from bridge.results import Click  # noqa: E402
from support.serve import ServeProcess  # noqa: E402

IMAGE = "TCGA-21-5786-01Z-00-DX1"


def load(data: Path, limit: int) -> tuple[np.ndarray, list[Click]]:
    img = np.asarray(Image.open(data / "monuseg" / "images" / f"{IMAGE}.png").convert("RGB"))
    lab = np.asarray(Image.open(data / "monuseg" / "labels" / f"{IMAGE}.png")).astype(np.int32)
    xy, _ = simulate_clicks(lab, jitter=3, seed=0)
    if limit:
        xy = xy[:limit]
    return np.ascontiguousarray(img), [Click(float(x), float(y), str(k)) for k, (x, y) in enumerate(xy)]


def start(n: int, weights: str | None, extra: list[str]) -> list[ServeProcess]:
    threads = max(1, (os.cpu_count() or 1) // n)
    flags = ["--threads", str(threads), *extra]
    if weights is None:
        from bridge.model.weights import default_weights_path

        weights = str(default_weights_path())
    return [ServeProcess(weights, *flags) for _ in range(n)]


def run(target: str, img: np.ndarray, clicks: list[Click], concurrency: int, max_tile: int):
    with NuClickClient(target, concurrency=concurrency) as cl:
        t0 = time.perf_counter()
        seg = cl.segment_tiled(ArrayReader(img), clicks, max_tile=max_tile)
        return time.perf_counter() - t0, seg.results, cl.retry_count


def same(a, b) -> bool:
    pairs = zip(a, b, strict=True)
    return all(x.found == y.found and (not x.found or x.polygon.equals_exact(y.polygon, 0.0)) for x, y in pairs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--replicas", default="1,2,3", help="replica counts to time (default: 1,2,3)")
    ap.add_argument("--clicks", type=int, default=0, help="use only the first N clicks (default: all)")
    ap.add_argument("--weights", default=None, help="weights file (default: the shipped weights)")
    ap.add_argument("--max-tile", type=int, default=512, help="tile side, so that one image makes many tiles")
    ap.add_argument("--no-kill", action="store_true", help="skip the replica-kill measurement")
    ap.add_argument(
        "--serve-flag", action="append", default=[], help="extra flag for serve (repeatable), e.g. --precision=fp32"
    )
    args = ap.parse_args()
    img, clicks = load(Path(args.data), args.clicks)
    counts = [int(n) for n in args.replicas.split(",")]
    rows = []
    reference = None
    for n in counts:
        replicas = start(n, args.weights, args.serve_flag)
        try:
            target = ",".join(r.grpc for r in replicas)
            run(target, img[:300, :300], [c for c in clicks if c.x < 300 and c.y < 300][:10], 2 * n, args.max_tile)
            seconds, results, _ = run(target, img, clicks, 2 * n, args.max_tile)
            found = sum(r.found for r in results)
            reference = reference or results
            rows.append({"replicas": n, "seconds": round(seconds, 2), "found": found, "nuclei_per_s": found / seconds})
            rate = found / seconds
            print(f"{n} replica(s): {found} nuclei in {seconds:.2f} s = {rate:.1f} nuclei/s", file=sys.stderr)
        finally:
            for r in replicas:
                r.kill()
    out = {"clicks": len(clicks), "cpu_count": os.cpu_count(), "runs": rows}
    if not args.no_kill:
        n = max(counts)
        clean = next(r["seconds"] for r in rows if r["replicas"] == n)
        replicas = start(n, args.weights, args.serve_flag)
        try:
            target = ",".join(r.grpc for r in replicas)
            run(target, img[:300, :300], [c for c in clicks if c.x < 300 and c.y < 300][:10], 2 * n, args.max_tile)
            timer = threading.Timer(clean / 3, lambda: replicas[0].signal(signal.SIGKILL))
            timer.start()
            seconds, results, retries = run(target, img, clicks, 2 * n, args.max_tile)
            timer.cancel()
            out["kill"] = {
                "replicas": n,
                "killed_at_s": round(clean / 3, 2),
                "seconds": round(seconds, 2),
                "clean_seconds": clean,
                "lost_s": round(seconds - clean, 2),
                "retried_tiles": retries,
                "same_result": same(results, reference),
            }
            print(
                f"{n} replicas, one SIGKILLed at {clean / 3:.2f} s: {seconds:.2f} s (clean {clean:.2f} s, "
                f"{retries} tile(s) sent again, same result: {out['kill']['same_result']})",
                file=sys.stderr,
            )
        finally:
            for r in replicas:
                r.kill()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
