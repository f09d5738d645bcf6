"""Start-up cost of ``nuclick-bridge segment`` and ``nuclick-bridge serve`` on
this machine, in each precision, with a cold and a warm ONNX cache (no
assertions).

* ``segment``, run on a small image: ``first nucleus`` is the time from process
  start until the output of a one-click run is written (the command writes it
  once, atomically, after the last nucleus); ``fixed`` is that minus one
  nucleus' work, measured from the same command with ``--clicks`` clicks;
  ``wall`` is until the process has exited (interpreter shut-down included);
  ``cpu`` is the process' user + system time.
* ``serve``: from process start until ``GET /healthz`` answers 200 (ready),
  and until a first one-click ``POST /v1/segment`` has its answer.

Each precision gets a fresh cache folder (``NUCLICK_BRIDGE_CACHE``): its first
run finds it empty (cold), the later ones find what that run wrote (warm).
``cache`` says what the runs did with it: ``miss`` (exported the network and
wrote it), ``hit`` (read it, wrote nothing), ``unused`` (the torch back end, for
bf16 or a GPU, runs without ONNX).  The image is synthetic (dark disks on a
pink background, a click in each).  Threads are the command's defaults unless
``OMP_NUM_THREADS`` says otherwise.  Figures are medians of ``--repeats`` runs
(the minimum in brackets): on a busy machine, compare them run against run.

    python benchmarks/startup.py [--precisions fp32,auto] [--repeats 3] [--clicks 32] [--no-serve]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 256  # pixels of the synthetic image
STEP = 32  # pixels between nuclei
RADIUS = 7
POLL = 0.005  # seconds between looks at the output file / the health check


def cpu_model() -> tuple[str, set[str]]:
    """The CPU's name and its feature flags (Linux), else what platform says."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name or platform.machine(), flags


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def make_image(folder: Path) -> tuple[Path, list[tuple[float, float]]]:
    """A PNG of dark disks on a noisy pink background, and the centre of each disk."""
    rng = np.random.default_rng(0)
    img = np.empty((SIDE, SIDE, 3), np.float32)
    img[:] = (228, 196, 218)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    centres = [(x + 0.5, y + 0.5) for y in range(STEP // 2, SIDE, STEP) for x in range(STEP // 2, SIDE, STEP)]
    for x, y in centres:
        img[(xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= RADIUS**2] = (92, 52, 132)
    img += rng.normal(0, 6, img.shape)
    path = folder / "tiny.png"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path, centres


def write_clicks(folder: Path, centres: list[tuple[float, float]], n: int) -> Path:
    path = folder / f"clicks{n}.csv"
    path.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in centres[:n]))
    return path


def snapshot(cache: Path) -> dict[str, tuple[int, int]]:
    """Each cache file's inode and size: a file written (replaced) gets a new inode; reading
    one changes only its time (the cache's least-recently-used record)."""
    return {p.name: (p.stat().st_ino, p.stat().st_size) for p in cache.rglob("*") if p.is_file()}


def cache_use(before: dict, after: dict) -> str:
    if after != before:
        return "miss"
    return "hit" if after else "unused"


def command() -> list[str]:
    script = Path(sys.executable).with_name("nuclick-bridge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bridge.cli"]


@dataclass
class Run:
    first: float  # seconds from start until the output was written
    wall: float  # until the process exited
    cpu: float  # its user + system seconds
    found: int
    cache: str


def segment(image: Path, clicks: Path, out: Path, precision: str, env: dict, cache: Path) -> Run:
    cmd = [*command(), "segment", str(image), "--points", str(clicks), "--out", str(out), "--precision", precision]
    out.unlink(missing_ok=True)
    before, usage = snapshot(cache), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and out.exists():
            first = time.perf_counter() - t0
        time.sleep(POLL)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"segment failed ({proc.returncode}): {stderr.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    found = json.loads(stdout.strip().splitlines()[-1])["found"]
    return Run(wall if first is None else first, wall, cpu, found, cache_use(before, snapshot(cache)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def serve(image: Path, centre: tuple[float, float], precision: str, env: dict, cache: Path, log: Path) -> Run:
    """``first``: seconds until /healthz answered 200; ``wall``: until a first click was answered."""
    port = free_port()
    tile = {"encoding": "PNG", "data": base64.b64encode(image.read_bytes()).decode(), "width": SIDE, "height": SIDE}
    request = json.dumps({"tile": tile, "clicks": [{"x": centre[0], "y": centre[1], "id": "1"}]}).encode()
    cmd = [*command(), "serve", "--port", str(free_port()), "--http-port", str(port), "--precision", precision]
    before = snapshot(cache)
    with open(log, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cmd, "--log-format", "text", "--grace", "1"], env=env, stderr=err)
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
                try:
                    if call(port, "GET", "/healthz")[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(POLL)
            ready = time.perf_counter() - t0
            status, body = call(port, "POST", "/v1/segment", request)
            answered = time.perf_counter() - t0
            if status != 200:
                raise SystemExit(f"/v1/segment answered {status}: {body[:300]!r}")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    found = len(json.loads(body).get("results", []))
    return Run(ready, answered, float("nan"), found, cache_use(before, snapshot(cache)))


def med(runs: list[Run], field: str) -> str:
    values = [getattr(r, field) for r in runs]
    return f"{statistics.median(values):.2f} s ({min(values):.2f})"


def uses(runs: list[Run]) -> str:
    return "/".join(sorted({r.cache for r in runs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default="fp32,auto", help="--precision values to time (default: fp32,auto)")
    ap.add_argument("--repeats", type=int, default=3, help="warm runs of each measurement (default: 3)")
    ap.add_argument("--clicks", type=int, default=32, help="clicks of the runs that measure one nucleus' work")
    ap.add_argument("--no-serve", action="store_true", help="time segment only")
    args = ap.parse_args()
    name, flags = cpu_model()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"CPU: {name}; {os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} usable; load average {load}")
    print(
        f"avx512_bf16: {'yes' if 'avx512_bf16' in flags else 'no'}; amx_bf16: {'yes' if 'amx_bf16' in flags else 'no'}"
    )
    print(
        f"python {platform.python_version()}, torch {version('torch')}, onnxruntime {version('onnxruntime')}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="nb-startup-"))
    try:
        image, centres = make_image(tmp)
        n = max(2, min(args.clicks, len(centres)))
        one, many, out = write_clicks(tmp, centres, 1), write_clicks(tmp, centres, n), tmp / "o.geojson"
        for precision in args.precisions.split(","):
            cache = tmp / f"cache-{precision}"
            cache.mkdir()
            env = dict(os.environ, NUCLICK_BRIDGE_CACHE=str(cache))
            print(f"\nsegment --precision {precision}")
            cold = segment(image, one, out, precision, env, cache)
            warm = [segment(image, one, out, precision, env, cache) for _ in range(args.repeats)]
            big = [segment(image, many, out, precision, env, cache) for _ in range(args.repeats)]
            per = statistics.median(r.first for r in big) - statistics.median(r.first for r in warm)
            per = max(0.0, per / (n - 1))
            print(f"  one nucleus' work: {1000 * per:.0f} ms ({n} clicks: {big[0].found} found)")
            for label, runs in (("cold cache", [cold]), ("warm cache", warm)):
                fixed = [Run(r.first - per, r.wall, r.cpu, r.found, r.cache) for r in runs]
                print(
                    f"  {label}: fixed {med(fixed, 'first')}, first nucleus {med(runs, 'first')}, "
                    f"wall {med(runs, 'wall')}, cpu {med(runs, 'cpu')}; cache {uses(runs)}"
                )
            if args.no_serve:
                continue
            shutil.rmtree(cache)
            cache.mkdir()
            print(f"serve --precision {precision}")
            log = tmp / "serve.log"
            cold = serve(image, centres[0], precision, env, cache, log)
            warm = [serve(image, centres[0], precision, env, cache, log) for _ in range(args.repeats)]
            for label, runs in (("cold cache", [cold]), ("warm cache", warm)):
                print(
                    f"  {label}: ready {med(runs, 'first')}, first click answered {med(runs, 'wall')}; "
                    f"cache {uses(runs)}"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
