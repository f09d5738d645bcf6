"""Pieces shared by the commands that segment."""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

from bridge.errors import BridgeInputError

PRECISION_HELP = (
    "network arithmetic: auto (default) uses bf16 on a CPU with bfloat16 instructions and fp16 on a CUDA GPU, "
    "else fp32; fp32 is slower but bit-for-bit stable across machines"
)

BACKEND_HELP = (
    "what runs the network: auto (default) = onnxruntime where it computes in fp32 on the CPU (a CPU without "
    "bf16 instructions, or --precision fp32), where it is faster, and torch otherwise; torch; or onnxruntime "
    "(fp32 on the CPU only). Same results either way; benchmarks/nuclei_per_second.py times both on this machine"
)


def add_device_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, inference: bool = True) -> None:
    """--device and --precision, the same for every command that runs the
    network, and --backend for those that only run it forward (not train)."""
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the network runs: auto picks a CUDA GPU when torch sees one (default: auto)",
    )
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help=PRECISION_HELP)
    if inference:
        p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime"), help=BACKEND_HELP)
        p.add_argument("--model", default="accurate", choices=("accurate", "fast"), help=MODEL_HELP)


MODEL_HELP = (
    "accurate (default): every view of the weights file (the shipped network looks at each click three times, at "
    "three magnifications); fast: the whole-patch view alone, about three times the nuclei/s for about 0.008 AJI "
    "on monuseg and 0.024 on consep (bridge/weights/MODEL_CARD.md), for CPUs where accurate is too slow"
)

SERVER_HELP = (
    "segment on running 'nuclick-bridge serve' replicas instead of in this process (same output): HOST:PORT, "
    "a list HOST:PORT,HOST:PORT,... or a gRPC target such as dns:///nuclick.lab.svc:50051; calls are spread "
    "over the healthy replicas. Token and TLS from NUCLICK_BRIDGE_TOKEN / NUCLICK_BRIDGE_CA"
)


MODEL_NAME_HELP = (
    "with --server: the server's model to segment with, by the name it serves it under ('serve --weights "
    "NAME=FILE' or a file stem in 'serve --models-dir'; GET /v1/model lists them); default: the server's default"
)


TIMEOUT_HELP = (
    "with --server: how long each tile may take on the server, in seconds, waiting in its queue and retries "
    "included; past it the command stops with an error. Default: scaled with the work, 120 s plus, for each "
    "tile in flight, 0.25 s per click and 2 s per megapixel of the tile (time for a server doing 4 nuclei/s). "
    "Raise it for a slow or shared server that still runs out of time; a busy server is asked again, as often "
    "as it allows, until then"
)


def add_server_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--server, --concurrency, --model-name and --timeout, the same for every command that can segment on a
    server."""
    p.add_argument("--server", default=None, metavar="TARGET", help=SERVER_HELP)
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="with --server: tiles in flight at once (default: 4; about 2 per replica keeps every replica busy)",
    )
    p.add_argument("--model-name", default=None, metavar="NAME", help=MODEL_NAME_HELP)
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help=TIMEOUT_HELP)


def check_server_options(args: argparse.Namespace) -> None:
    """One line for a bad --server, --concurrency or --timeout, before any work starts."""
    if getattr(args, "concurrency", None) is not None and not getattr(args, "server", None):
        raise BridgeInputError("--concurrency applies to --server only")
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not getattr(args, "server", None):
        raise BridgeInputError("--timeout is the deadline of each call to a server (with --server)")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise BridgeInputError(f"--timeout must be a positive number of seconds, not {timeout:g}")
    name = getattr(args, "model_name", None)
    if name is not None and not getattr(args, "server", None):
        raise BridgeInputError(
            "--model-name picks one of a server's models (with --server); here use --weights FILE for other weights"
        )
    if name is not None and not name.strip():
        raise BridgeInputError("--model-name is empty; leave it out for the server's default model")
    if getattr(args, "server", None) is not None and getattr(args, "model", "accurate") != "accurate":
        raise BridgeInputError("--model applies to this process's network; start the server with serve --model fast")
    if getattr(args, "server", None) is not None:
        from bridge.targets import parse_target

        parse_target(args.server)
        n = getattr(args, "concurrency", None)
        if n is not None and not 1 <= n <= 256:
            raise BridgeInputError(f"--concurrency must be between 1 and 256, not {n}")


# errno values that say "this place cannot take the file", not a bug: one line, not "internal error".
_NO_SPACE = {errno.ENOSPC: "no space left on device", getattr(errno, "EDQUOT", errno.ENOSPC): "disk quota exceeded"}


@contextlib.contextmanager
def disk_errors(path: str | Path, flag: str = "--out") -> Iterator[None]:
    """Turn a full disk, a quota or a read-only file system met while writing
    ``path`` into one readable line (a :class:`BridgeInputError`); the writers
    used here (a spool, :func:`bridge.io.geojson.atomic_writer`) leave no
    half-written file behind."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise BridgeInputError(
                f"{_NO_SPACE[exc.errno]} writing {path}: free some space or choose another {flag}"
            ) from None
        if exc.errno == errno.EROFS:
            raise BridgeInputError(f"read-only file system writing {path}: choose another {flag}") from None
        raise


def check_free_space(path: str | Path, needed: int, what: str, flag: str = "--out") -> None:
    """Fail in one line, before any work, when the file system of ``path``
    has less than ``needed`` bytes free (``what``: the estimate's basis)."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        free = shutil.disk_usage(directory).free
    except OSError:  # a place that cannot say: the write itself will tell
        return
    if free < needed:
        raise BridgeInputError(
            f"not enough free space for {flag} {path}: {what} need about {_size(needed)}, {directory} has "
            f"{_size(free)} free: free some space or choose another {flag}"
        )


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def make_segmenter(args: argparse.Namespace):
    """The NuClick engine or the watershed baseline, as the flags ask.

    Both offer ``segment(reader, clicks, progress=False) -> Segmentation``.
    """
    tolerance = getattr(args, "tolerance", 0.5)
    check_server_options(args)
    if getattr(args, "server", None) is not None:
        from bridge.client import RemoteSegmenter

        return RemoteSegmenter.from_args(args)
    if args.method == "watershed":
        from bridge.evaluation.watershed import WatershedSegmenter

        return WatershedSegmenter(simplify_tolerance=tolerance)
    from bridge.nuclick.engine import NuClickEngine

    if args.batch_size < 1:
        raise BridgeInputError("--batch-size must be at least 1")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise BridgeInputError("--threshold must be between 0 and 1")
    return NuClickEngine.load(
        args.weights,
        device=args.device,
        batch_size=args.batch_size,
        threshold=args.threshold,
        simplify_tolerance=tolerance,
        precision=args.precision,
        tta=getattr(args, "tta", 1),
        backend=getattr(args, "backend", "auto"),
        model=getattr(args, "model", "accurate"),
    )
