"""The gRPC service's figures, in one run on this machine (no assertions):

1. single-click round trip, p50/p99, over gRPC and over HTTP/JSON
   (a 256x256 real tile per request, one click);
2. throughput in nuclei/s on one real image with every nucleus clicked:
   in-process engine vs ``SegmentStream`` (``NuClickClient.segment_tiled``,
   exact whole-image answers) vs ``SegmentStream`` of a grid of independent
   tiles (pipelining), same weights, same device;
3. the server process's RSS, idle and under load (peak).

The server runs as a real ``nuclick-bridge serve`` subprocess on 127.0.0.1.
Weights: the shipped ones when installed, else a random NuClickNet of
``--width`` (speed does not depend on the weights).

    python benchmarks/grpc_service.py [--data ../shared/data] [--device cpu] [--clicks 96]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from google.protobuf import json_format
from PIL import Image

from bridge.client import NuClickClient, TileJob
from bridge.evaluation.clicks import simulate_clicks
from bridge.io.imageio import ArrayReader
from bridge.model.network import NuClickNet
from bridge.model.weights import default_weights_path, save_weights
from bridge.nuclick.engine import NuClickEngine
from bridge.results import Click
from bridge.service.convert import tile_to_pb
from bridge.service.gen import nuclick_pb2 as pb


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler:
    """Peak RSS of a process, sampled every 20 ms while running."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def start_server(weights: Path, device: str, max_batch: int, threads: int) -> tuple[subprocess.Popen, str, int]:
    cmd = [sys.executable, "-m", "bridge.cli", "serve", "--weights", str(weights), "--device", device]
    cmd += ["--port", "0", "--http-port", "0", "--max-batch", str(max_batch), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if '"msg": "listening"' in line:
            event = json.loads(line)
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain logs
            return proc, event["grpc"], int(event["http"].rsplit(":", 1)[1])
    raise SystemExit("the server did not start")


def percentiles(ms: list[float]) -> dict:
    a = np.array(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 1), "p99_ms": round(float(np.percentile(a, 99)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
        help="the shared data folder; the image is read from its monuseg/ (default: ../shared/data)",
    )
    ap.add_argument("--image", default="TCGA-21-5786-01Z-00-DX1", help="monuseg image to click (default: %(default)s)")
    ap.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where the network runs (default: cpu)"
    )
    ap.add_argument("--width", type=float, default=0.25, help="network width when no weights are shipped")
    ap.add_argument("--weights", default=None, help="weights file (default: shipped, else random)")
    ap.add_argument("--requests", type=int, default=40, help="single-click requests per transport")
    ap.add_argument("--clicks", type=int, default=96, help="nuclei for the throughput runs (0: all)")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default: 32)")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads, in-process and in the server (0: default)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="throughput runs of each kind; the best counts")
    args = ap.parse_args()

    data = Path(args.data) / "monuseg"
    img = np.asarray(Image.open(data / "images" / f"{args.image}.png").convert("RGB"))
    lab = np.asarray(Image.open(data / "labels" / f"{args.image}.png")).astype(np.int32)
    xy, _ = simulate_clicks(lab, jitter=3, seed=0)
    if args.clicks:
        xy = xy[np.random.default_rng(0).permutation(len(xy))[: args.clicks]]
    clicks = [Click(float(x), float(y), str(i)) for i, (x, y) in enumerate(xy)]

    tmp = Path(tempfile.mkdtemp())
    if args.weights:
        weights, source = Path(args.weights), "given weights"
    elif default_weights_path().is_file():
        weights, source = default_weights_path(), "shipped weights"
    else:
        torch.manual_seed(0)
        weights, source = tmp / "random.pt", f"random weights, width {args.width}"
        save_weights(weights, NuClickNet(args.width), {"name": "random"})
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    threads = args.threads or torch.get_num_threads()
    print(f"# {source}; device {device}; torch threads {threads}; cpus {os.cpu_count()}")

    if args.threads:
        torch.set_num_threads(args.threads)
    proc, target, http_port = start_server(weights, device, args.max_batch, args.threads)
    out: dict = {"device": device, "weights": source}
    try:
        client = NuClickClient(target, timeout=600)
        info = client.info()
        tile = np.ascontiguousarray(img[300:556, 400:656])
        one = [Click(128.5, 128.5, "a")]
        for _ in range(5):  # warm-up: first batches, allocator, connections
            client.segment(tile, one)
        out["rss_idle_mb"] = round(rss_mb(proc.pid), 1)

        # 1. single-click latency, gRPC and HTTP requests interleaved so that both
        #    meet the same load on the machine
        req = pb.SegmentRequest(tile=tile_to_pb(tile))
        req.clicks.add(x=128.5, y=128.5, id="a")
        body = json_format.MessageToJson(req, indent=None).encode()
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=600)
        grpc_ms, http_ms = [], []
        for k in range(args.requests + 3):
            t0 = time.perf_counter()
            client.segment(tile, one)
            t1 = time.perf_counter()
            conn.request("POST", "/v1/segment", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            json.loads(resp.read())
            t2 = time.perf_counter()
            if k >= 3:
                grpc_ms.append(1000 * (t1 - t0))
                http_ms.append(1000 * (t2 - t1))
        conn.close()
        out["single_click_grpc"] = percentiles(grpc_ms)
        out["single_click_http"] = percentiles(http_ms)
        out["http_body_kb"] = round(len(body) / 1024, 1)

        # 2. throughput, same image, same weights, same device; best of --repeat
        #    alternating runs, since other work on the machine makes single runs noisy.
        engine = NuClickEngine.load(weights, device=device, batch_size=args.max_batch)
        engine.segment(ArrayReader(tile), one)  # warm-up
        grid = 4
        h, w = img.shape[0] // grid, img.shape[1] // grid
        jobs = []
        for gy in range(grid):
            for gx in range(grid):
                mine = [c for c in clicks if gx * w <= c.x < (gx + 1) * w and gy * h <= c.y < (gy + 1) * h]
                if mine:
                    jobs.append(TileJob(img[gy * h : (gy + 1) * h, gx * w : (gx + 1) * w], mine, (gx * w, gy * h)))
        t_local = t_stream = t_grid = float("inf")
        with Sampler(proc.pid) as sampler:
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                local = engine.segment(ArrayReader(img), clicks).results
                t_local = min(t_local, time.perf_counter() - t0)
                t0 = time.perf_counter()
                remote = client.segment_tiled(ArrayReader(img), clicks).results
                t_stream = min(t_stream, time.perf_counter() - t0)
                t0 = time.perf_counter()
                n_grid = sum(len(r) for r in client.segment_many(jobs))
                t_grid = min(t_grid, time.perf_counter() - t0)
        del engine
        same = sum(
            a.found == b.found and (not a.found or a.polygon.equals_exact(b.polygon, 1e-6))
            for a, b in zip(local, remote, strict=True)
        )
        n = len(clicks)
        out["throughput_nuclei_per_s"] = {
            "in_process": round(n / t_local, 2),
            "stream_segment_tiled": round(n / t_stream, 2),
            "stream_vs_in_process": round(t_local / t_stream, 3),
            f"stream_{len(jobs)}_tiles": round(n_grid / t_grid, 2),
            "grid_vs_in_process": round((n_grid / t_grid) / (n / t_local), 3),
            "nuclei": n,
            "same_polygons_as_in_process": f"{same}/{n}",
        }
        out["rss_under_load_peak_mb"] = round(sampler.peak, 1)
        out["rss_hwm_mb"] = round(rss_mb(proc.pid, "VmHWM"), 1)
        out["model"] = f"{info.model_name} {info.model_version} patch {info.patch_size}"
        client.close()
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
