"""Peak memory and nuclei per second of whole-slide runs: ``segment`` on a local
pyramidal TIFF, and the same run through ``nuclick-bridge serve``.

    python benchmarks/slide_memory.py [--size 100000] [--clicks 50000] [--work /tmp/slide_memory]
                                      [--modes local,server] [--method nuclick]

The slide is built once (``--work``, reused when present): a ``--size`` square
pyramidal TIFF of 256 px JPEG tiles, a mosaic of real MoNuSeg crops written
tile by tile from a generator (tests/support/slides.py; 100,000 px takes
about a minute and ~4.5 GB of disk).  Clicks are every nucleus (from the real
labels) of randomly chosen 512 px blocks spread over the slide.

Each run is a child process; its peak RSS comes from ``getrusage`` (the
server's from ``VmHWM`` before it stops).  Prints one JSON line per run and
whether the local and server outputs hold the same nuclei.  The target
(issue 15): peak RSS <= 1.5 GB for 50,000 clicks on a 100,000 px slide.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # support.slides (generator), support.serve (child server)

from support.serve import ServeProcess  # noqa: E402
from support.slides import describe, load_sources, slide_clicks, write_clicks_csv, write_slide  # noqa: E402

WEIGHTS = ROOT / "bridge" / "weights" / "nuclick_default.pt"


def child(args: list[str]) -> tuple[float, dict, float]:
    """Run ``nuclick-bridge ARGS``; (peak RSS MiB, its JSON summary, wall seconds)."""
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", *args], stdout=subprocess.PIPE, env=env)
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"nuclick-bridge {' '.join(args[:1])} failed (exit {os.waitstatus_to_exitcode(status)})")
    return usage.ru_maxrss / 1024, json.loads(out.decode().strip().splitlines()[-1]), time.perf_counter() - t0


def peak_of(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]


def nuclei(path: Path) -> list:
    """The features of a GeoJSON output without their random ids, for comparison."""
    doc = json.loads(path.read_text())
    for f in doc["features"]:
        f.pop("id", None)
    return doc["features"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100_000, help="slide side in px (default 100000)")
    ap.add_argument("--clicks", type=int, default=50_000, help="clicks (default 50000)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slide_memory"), help="where the slide and outputs go")
    ap.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "monuseg",
        help="monuseg folder the slide is tiled from",
    )
    ap.add_argument("--modes", default="local,server", help="local, server or both (default)")
    ap.add_argument("--method", default="nuclick", choices=("nuclick", "watershed"), help="local runs only")
    ap.add_argument("--concurrency", type=int, default=4, help="tiles in flight in server mode (default 4)")
    a = ap.parse_args()

    a.work.mkdir(parents=True, exist_ok=True)
    slide = a.work / f"slide_{a.size}.tif"
    sources = load_sources(a.data)
    if not slide.exists():
        t0 = time.perf_counter()
        tmp = slide.with_suffix(".partial.tif")
        write_slide(tmp, a.size, sources)
        tmp.rename(slide)
        print(f"built {slide} in {time.perf_counter() - t0:.0f} s, {slide.stat().st_size / 2**30:.2f} GiB", flush=True)
    print(f"slide {slide}: {describe(slide)}", flush=True)
    points = a.work / f"clicks_{a.size}_{a.clicks}.csv"
    write_clicks_csv(points, slide_clicks(a.size, sources, a.clicks, seed=0))

    base = ["segment", str(slide), "--points", str(points)]
    outputs = {}
    for mode in a.modes.split(","):
        out = a.work / f"out_{mode}.geojson"
        if mode == "local":
            rss, summary, wall = child([*base, "--out", str(out), "--method", a.method])
            record = {"mode": "local", "method": a.method, "peak_rss_mb": round(rss)}
        elif mode == "server":
            with ServeProcess(WEIGHTS) as server:
                flags = ["--out", str(out), "--server", server.grpc, "--concurrency", str(a.concurrency)]
                rss, summary, wall = child([*base, *flags])
                server_rss = peak_of(server.proc.pid)
                server.signal(signal.SIGTERM)
                server.wait(120)
            record = {"mode": "server", "client_peak_rss_mb": round(rss), "server_peak_rss_mb": round(server_rss)}
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        outputs[mode] = out
        record.update(
            size=a.size,
            clicks=summary["clicks"],
            found=summary["found"],
            seconds=summary["seconds"],
            wall_s=round(wall, 1),
            nuclei_per_s=round(summary["clicks"] / summary["seconds"], 1),
        )
        print(json.dumps(record), flush=True)
    if len(outputs) == 2 and a.method == "nuclick":
        same = nuclei(outputs["local"]) == nuclei(outputs["server"])
        print(json.dumps({"local_equals_server": same}), flush=True)


if __name__ == "__main__":
    main()
