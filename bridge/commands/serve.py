"""``nuclick-bridge serve``: NuClick over gRPC and HTTP/JSON.

Only argparse is imported at module level: the parser is built for every
command, and torch loads only when the server starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bridge.commands.common import add_device_options
from bridge.errors import BridgeInputError

WEIGHTS_HELP = (
    "a weights file to serve: NAME=FILE serves FILE under NAME (requests choose it with their model name, "
    "clients with --model-name NAME); a plain FILE replaces the default model, the one a request that names "
    "none gets (default: the weights shipped inside the package). Repeatable"
)
MODELS_DIR_HELP = (
    "serve every *.pt file in DIR too, named by its file stem (lung.pt is 'lung'); on SIGHUP the server reads "
    "DIR again without a restart: new files go live, removed ones leave, changed ones are loaded again, and "
    "requests in flight finish with the model they started with. If a file fails to load, the models served "
    "stay as they were (the reason is logged)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``serve`` (the subparser itself is registered in bridge.cli)."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (default: 50051)")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP/JSON port; 0 picks a free one (default: 8080)")
    p.add_argument("--no-http", action="store_true", help="serve gRPC only")
    p.add_argument(
        "--http-max-connections",
        type=int,
        default=1000,
        metavar="N",
        help="HTTP connections open at once, idle ones included; more are closed at once (default: 1000)",
    )
    p.add_argument(
        "--http-header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds an HTTP client has to send a whole request head, on a new connection and after each "
        "answer; a client that trickles it is disconnected (default: 10)",
    )
    p.add_argument(
        "--http-body-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds an HTTP client has to send a whole request body, after its token was checked; slower "
        "is a 408 (default: 60; raise it for big tiles over slow links)",
    )
    p.add_argument(
        "--http-keep-alive",
        type=float,
        default=15.0,
        metavar="S",
        help="seconds an idle kept-alive HTTP connection stays open (default: 15)",
    )
    p.add_argument("--weights", action="append", default=None, metavar="[NAME=]FILE", help=WEIGHTS_HELP)
    p.add_argument("--models-dir", default=None, metavar="DIR", help=MODELS_DIR_HELP)
    add_device_options(p)
    p.add_argument(
        "--max-batch", type=int, default=32, metavar="N", help="patches per network batch, across clients (default: 32)"
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=2.0,
        metavar="MS",
        help="how long a batch waits for other clients' patches (default: 2)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=32,
        metavar="N",
        help="calls (gRPC Segment, HTTP /v1/segment) computing at once; more wait in the queue (default: 32)",
    )
    p.add_argument(
        "--queue",
        type=int,
        default=512,
        metavar="N",
        help="calls that may wait for a free worker when all are busy, each holding its request in memory; "
        "beyond them a call is refused at once with RESOURCE_EXHAUSTED (HTTP 429) and a hint of when to retry "
        "(gRPC trailing metadata retry-after-ms, HTTP Retry-After). 0: never wait (default: 512)",
    )
    p.add_argument(
        "--threads", type=int, default=0, metavar="N", help="CPU threads for torch's forward pass (0: torch's default)"
    )
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="TLS certificate chain (with --tls-key)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="TLS private key (with --tls-cert)")
    p.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="require 'authorization: Bearer <token>' on gRPC and HTTP; FILE holds the token",
    )
    p.add_argument("--max-message-mb", type=float, default=64.0, help="largest request in MiB (default: 64)")
    p.add_argument("--max-tile-side", type=int, default=4096, help="largest tile side in pixels (default: 4096)")
    p.add_argument("--max-clicks", type=int, default=1000, help="most clicks per request (default: 1000)")
    p.add_argument("--max-streams", type=int, default=8, help="most concurrent SegmentStream calls (default: 8)")
    p.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="end a stream (DEADLINE_EXCEEDED) that sends nothing for this long while none of its requests is "
        "being answered, so that idle clients cannot hold the --max-streams slots; 0: never (default: 60)",
    )
    p.add_argument("--grace", type=float, default=30.0, help="seconds calls in flight get at shutdown (default: 30)")
    p.add_argument("--log-format", default="json", choices=("json", "text"), help="log lines (default: json)")


def parse_weights(values: list[str] | None) -> tuple[str | None, dict[str, str]]:
    """``--weights`` values: (the default model's file or None for the shipped one,
    {name: file} of the named ones).  ``NAME=FILE`` when the part before the
    first "=" is a model name, else a plain FILE; ``default=FILE`` is a plain FILE."""
    from bridge.service.models import DEFAULT_MODEL, NAME_PATTERN, check_name

    default: str | None = None
    named: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not NAME_PATTERN.fullmatch(name):
            if "=" in value and "/" not in name and "\\" not in name:
                check_name(name, f"--weights {value!r}:")
            name, path = DEFAULT_MODEL, value
        if not path:
            raise BridgeInputError(f"--weights {value!r} names no file; use --weights NAME=FILE")
        if name == DEFAULT_MODEL:
            if default is not None:
                raise BridgeInputError(
                    f"--weights gives the default model twice ({default} and {path}); name the others with NAME=FILE"
                )
            default = path
        elif name in named:
            raise BridgeInputError(f"--weights names two models {name!r} ({named[name]} and {path})")
        else:
            named[name] = path
    return default, named


def build_server(args: argparse.Namespace):
    """Load the engines and configure the server (not started); the models
    folder is read when the server starts."""
    from bridge.nuclick.engine import NuClickEngine
    from bridge.service.auth import read_tls, read_token_file
    from bridge.service.core import Limits
    from bridge.service.http import HttpBounds
    from bridge.service.server import NuClickServer

    for name in ("port", "http_port"):
        value = getattr(args, name)
        if not 0 <= value <= 65535:
            raise BridgeInputError(f"--{name.replace('_', '-')} must be between 0 and 65535")
    if args.threads < 0:
        raise BridgeInputError("--threads must be >= 0")
    if args.max_message_mb <= 0:
        raise BridgeInputError("--max-message-mb must be positive")
    limits = Limits(
        max_message_bytes=int(args.max_message_mb * (1 << 20)),
        max_tile_side=args.max_tile_side,
        max_clicks_per_request=args.max_clicks,
        max_concurrent_streams=args.max_streams,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_queued_calls=args.queue,
        stream_idle_timeout_s=args.stream_idle_timeout,
    )
    limits.check()
    if args.workers < 1:
        raise BridgeInputError("--workers must be at least 1")
    token = read_token_file(args.token_file) if args.token_file else None
    tls = read_tls(args.tls_cert, args.tls_key)
    default, named = parse_weights(args.weights)
    models_dir = Path(args.models_dir) if args.models_dir else None
    if models_dir is not None and not models_dir.is_dir():
        raise BridgeInputError(f"--models-dir: folder not found: {models_dir}")

    def load(path: str | Path | None) -> NuClickEngine:
        return NuClickEngine.load(
            path,
            device=args.device,
            batch_size=args.max_batch,
            precision=args.precision,
            backend=args.backend,
            threads=args.threads,
            model=args.model,
        )

    engines = {"default": load(default)}
    for name, path in named.items():
        try:
            engines[name] = load(path)
        except BridgeInputError as exc:
            raise BridgeInputError(f"--weights {name}={path}: {exc}") from None
    return NuClickServer(
        engines,
        host=args.host,
        port=args.port,
        http_port=None if args.no_http else args.http_port,
        limits=limits,
        token=token,
        tls=tls,
        workers=args.workers,
        threads=args.threads,
        models_dir=models_dir,
        load=load,
        http_bounds=HttpBounds(
            max_connections=args.http_max_connections,
            header_timeout=args.http_header_timeout,
            body_timeout=args.http_body_timeout,
            keep_alive=args.http_keep_alive,
        ),
    )


def _limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives every thread that allocates its own malloc arena, and the
    server has dozens of threads handling large arrays: capping the arenas
    (as MALLOC_ARENA_MAX does) cut peak RSS under load by about a quarter in
    benchmarks/grpc_service.py.  Elsewhere (macOS, musl) this does nothing."""
    import ctypes
    import ctypes.util
    import os

    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from bridge.service.logs import configure

    _limit_malloc_arenas()
    configure(args.log_format)
    server = build_server(args).start()
    stop = threading.Event()
    reload = threading.Event()
    received: list[str] = []

    def on_signal(signum, frame) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    def on_hangup(signum, frame) -> None:
        reload.set()  # the loop below reads the folder: a signal handler must not block on loading files

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hangup)
    from bridge.service.core import log_event

    while not stop.wait(0.1):
        if reload.is_set():
            reload.clear()  # a SIGHUP during the reload reads the folder once more afterwards
            log_event("signal", signal="SIGHUP")
            if server.models_dir is None:
                log_event("models reload skipped", reason="the server has no --models-dir to read again")
            else:
                server.reload_models()

    log_event("signal", signal=received[0] if received else None)
    server.stop(grace=args.grace)
    return 0
