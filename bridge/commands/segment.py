"""``nuclick-bridge segment``: one image, its clicks, a QuPath GeoJSON out."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bridge.commands.common import check_free_space, disk_errors, make_segmenter
from bridge.errors import BridgeInputError
from bridge.io.geojson import GeoJsonSpool, check_writable
from bridge.io.imageio import open_image
from bridge.io.points import read_points, validate_clicks
from bridge.results import NucleusResult

# What one nucleus takes in the output, in bytes, for the free-space check: a feature
# averaged 1,313 bytes (532 to 2,562) on a monuseg image at the default --tolerance; a
# round figure below that, so that the check refuses only runs that cannot fit (a run
# that needs more is still stopped cleanly by the write itself).  Twice, because the
# spool and the finished file are both on disk until the spool is closed.
BYTES_PER_NUCLEUS = 1024
SPOOL_COPIES = 2


def output_bytes(n_clicks: int) -> int:
    """About how much free space ``--out`` needs for ``n_clicks`` nuclei."""
    return SPOOL_COPIES * BYTES_PER_NUCLEUS * n_clicks + 4096


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_writable(out)  # before any compute: a run must not be lost to an unwritable --out
    if args.tolerance < 0:
        raise BridgeInputError("--tolerance must be >= 0")
    clicks = read_points(args.points)
    check_free_space(out, output_bytes(len(clicks)), f"the outlines of {len(clicks)} clicks")
    t0 = time.perf_counter()
    missing: list[tuple[int, NucleusResult]] = []
    with open_image(args.image) as reader:
        validate_clicks(clicks, reader.width, reader.height)
        segmenter = make_segmenter(args)
        # Results are spooled to --out as they become final: memory stays bounded
        # by the tiles in flight, whatever the number of clicks.  A full disk on the
        # way is one line; the spool and the temp file vanish with the error.
        with disk_errors(out), GeoJsonSpool(out, len(clicks)) as spool:
            for k, r, _ in segmenter.iter_tiled(reader, clicks, progress=sys.stderr.isatty()):
                if not spool.add(k, r):
                    missing.append((k, r))
            n = spool.commit()
    missing.sort(key=lambda item: item[0])
    for _, r in missing:
        c = r.click
        print(f"not found: click {c.id} at ({c.x:.1f}, {c.y:.1f}): {r.reason}", file=sys.stderr)
    summary = {
        "clicks": len(clicks),
        "found": n,
        "not_found": len(missing),
        "out": str(out),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    client = getattr(segmenter, "client", None)
    if client is not None:  # --server: tiles sent again because a replica was unavailable or busy (none lost)
        busy = client.busy_retry_count
        summary["retries"] = client.retry_count
        summary["busy_retries"] = busy
        if client.retry_count - busy:
            print(
                f"note: {client.retry_count - busy} tile(s) were sent again because a server was unavailable; "
                "every click was answered once",
                file=sys.stderr,
            )
        if busy:
            print(
                f"note: a busy server asked for {busy} tile(s) to be sent again later; every click was answered "
                "once (more replicas or fewer tiles at once, --concurrency, would spare the waiting)",
                file=sys.stderr,
            )
    print(json.dumps(summary))
    return 0
