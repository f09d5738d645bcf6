"""Click-to-nucleus latency of the QuPath extension's live mode (its plain-Java
``LiveController``) against a real ``nuclick-bridge serve`` on this machine.

    python benchmarks/live_latency.py [--data ../shared/data] [--clicks 40] [--weights FILE] [--threads 0]

Starts a real server (a child process on 127.0.0.1, the shipped weights unless
``--weights``, with a token), writes a MoNuSeg validation image and one click per
nucleus, builds the Java core with ``qupath_extension/javatest.sh build`` and runs
``qupath.ext.nuclick.core.LiveLatency``, which times, through real HTTP and real
tiles: one click at a time on a crowded part of the image, the same points moved
by 3 px, and a click every 100 ms on another part.  Prints its lines (p50/p95/max
per scenario) and its JSON line.  Needs javac/java and Debian's gson jar, as the
extension's tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # support.serve: the test suite's child-process server

from bridge.evaluation.clicks import simulate_clicks  # noqa: E402
from support.serve import ServeProcess  # noqa: E402

IMAGE = "TCGA-21-5786-01Z-00-DX1"
TOKEN = "live-latency-token"
GSON_JAR = os.environ.get("GSON_JAR", "/usr/share/java/gson.jar")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--clicks", type=int, default=40, help="clicks per scenario (default 40)")
    ap.add_argument("--weights", help="weights file (default: the shipped weights)")
    ap.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: its default)")
    args = ap.parse_args()

    build = subprocess.run(
        ["bash", str(ROOT / "qupath_extension" / "javatest.sh"), "build"], capture_output=True, text=True
    )
    if build.returncode != 0:
        print(build.stdout + build.stderr, file=sys.stderr)
        return build.returncode
    classes = build.stdout.strip().splitlines()[-1]

    weights = args.weights
    if weights is None:
        from bridge.model.weights import default_weights_path

        weights = str(default_weights_path())
    with tempfile.TemporaryDirectory(prefix="live-latency-") as tmp:
        work = Path(tmp)
        img = Image.open(args.data / "monuseg" / "images" / f"{IMAGE}.png").convert("RGB")
        lab = np.asarray(Image.open(args.data / "monuseg" / "labels" / f"{IMAGE}.png")).astype(np.int32)
        xy, _ = simulate_clicks(lab, jitter=3, seed=0)
        img.save(work / "image.png")
        clicks = [[float(x), float(y), "Tumor" if k % 3 == 0 else None] for k, (x, y) in enumerate(xy)]
        (work / "clicks.json").write_text(json.dumps(clicks))
        (work / "token.txt").write_text(TOKEN + "\n")
        flags = ["--token-file", str(work / "token.txt")]
        if args.threads:
            flags += ["--threads", str(args.threads)]
        with ServeProcess(weights, *flags) as srv:
            cmd = ["java", "-cp", f"{classes}:{GSON_JAR}", "qupath.ext.nuclick.core.LiveLatency"]
            cmd += [f"http://{srv.http}", str(work / "image.png"), str(work / "clicks.json"), str(args.clicks)]
            return subprocess.run(cmd, env=dict(os.environ, NUCLICK_TOKEN=TOKEN)).returncode


if __name__ == "__main__":
    raise SystemExit(main())
