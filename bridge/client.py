"""Python client for ``nuclick-bridge serve`` (gRPC).  No torch needed.

The small API::

    from bridge.client import NuClickClient, segment
    from bridge.results import Click

    results = segment(tile, [Click(120.5, 80.5, "a")], server="gpu-box:50051")  # one call

    with NuClickClient("gpu-box:50051", token="...") as client:
        client.info()                                    # model, device, limits
        client.segment(tile, clicks, origin=(x0, y0))    # one tile -> list[NucleusResult]
        client.segment_tiled(reader, clicks)             # a whole (slide) image -> Segmentation

A server may hold several models, each under a name (``serve --weights
NAME=FILE``, ``--models-dir``): ``NuClickClient(..., model="lung")`` sends
every tile to that one, and :meth:`NuClickClient.info` describes it (its patch
size and pixel size plan the tiles); the default, ``model=""``, is the model a
server of one model has.

``tile`` is an (H, W, 3) uint8 RGB array whose top-left corner is at level-0
``origin``, sampled at ``downsample``; clicks and the returned polygons are in
level-0 coordinates (see :mod:`bridge.io.coords`).  Results come back as
:class:`bridge.results.NucleusResult`, one per click, in click order, exactly
as from the in-process engine.

The server may be one ``HOST:PORT``, a list ``HOST:PORT,HOST:PORT,...`` or a
gRPC target such as ``dns:///nuclick.lab.svc:50051`` (see :mod:`bridge.targets`):
gRPC's own ``round_robin`` policy spreads the calls over every address, and
its client-side health checking (the servers' standard health service) keeps
new work off a replica that is NOT_SERVING (draining) or gone.

Every call has a deadline and is retried with exponential backoff while the
server is UNAVAILABLE (restarting, briefly unreachable, a replica killed
mid-call: the retry goes to another replica), and, within its deadline, while
the server is busy: RESOURCE_EXHAUSTED with a ``retry-after-ms`` hint (its
queue is full), gRPC's own concurrent-call limit, or a stream slot to "retry
later".  The hint is honoured (never sooner, plus jitter so that waiting
clients do not return together); without one the pause doubles, jittered.  A
RESOURCE_EXHAUSTED that is a permanent limit (a message over the size limit,
too many clicks, a tile too large) is raised at once.  A tile is a pure
function of its request, so sending it again can change nothing: the answer
of a run with a replica killed equals that of a run against one server.

The deadline of a call is ``timeout`` seconds when given; by default
(``timeout=None``) it scales with the work: :func:`call_deadline`, at least
the 120 s every call had before, plus time for each click and megapixel of
the tile, times the tiles in flight at once (they queue on the same servers).
Errors the server reports (a bad tile, a wrong token, a limit) raise
:class:`ServerError`, a :class:`bridge.errors.BridgeInputError` whose message
names the server, the status and the reason.

Connectors take the segmenter from :class:`RemoteSegmenter`: the same
``segment`` / ``segment_tiled`` interface as ``bridge.nuclick.engine.NuClickEngine``.
Token and TLS come from arguments or the environment (``NUCLICK_BRIDGE_TOKEN``,
``NUCLICK_BRIDGE_CA`` = path of a PEM CA bundle, which turns TLS on).
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from scipy.spatial import cKDTree

from bridge.errors import BridgeInputError
from bridge.io.coords import patch_origin
from bridge.io.imageio import RegionReader
from bridge.results import Click, NucleusResult
from bridge.service.convert import click_to_pb, result_from_pb, tile_to_pb
from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.gen import nuclick_pb2_grpc as pb_grpc
from bridge.targets import parse_target

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_CONCURRENCY = 4
HEALTH_SERVICE = "nuclick.v1.NuClick"
# Codes that say "this replica, now" rather than "this request": the call is sent again
# (to another replica under round_robin).  Our servers answer UNAVAILABLE while draining.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
# RESOURCE_EXHAUSTED means "busy now" or "never": a full queue (our servers attach
# RETRY_AFTER_KEY, milliseconds), gRPC's maximum_concurrent_rpcs, no stream slot free; or a
# limit no retry can meet (gRPC's message size, our clicks / tile-side limits).  Busy is told
# by the hint or by these words; anything else with that code is permanent.
RETRY_AFTER_KEY = "retry-after-ms"
BUSY_WORDS = ("concurrent rpc limit exceeded", "retry later", "busy", "queue is full")
TOO_LARGE_WORDS = ("larger than max", "message larger than", "size larger than")
# Pause between busy retries without a hint grows to this (a busy answer is cheap for the server).
BUSY_MAX_BACKOFF_S = 5.0
# How long a stream without a deadline waits on a busy server before giving up.
BUSY_STREAM_WAIT_S = 120.0
# Deadline of a call by default (timeout=None), see call_deadline:
# - DEADLINE_BASE_S: the fixed deadline every call had before, never less: connecting, a
#   model load, a short queue ahead of this call, a slow link;
# - DEADLINE_PER_CLICK_S: 4 nuclei/s, the slowest a server does: the published-width network
#   did 4.2 nuclei/s on 2 CPU cores (docs/benchmarks.md), the shipped one about 100 there, so a
#   loaded one-thread replica of the shipped network stays well within it.  Every click of the
#   request counts, context too (their masks are computed);
# - DEADLINE_PER_MEGAPIXEL_S: decoding, resampling and encoding a tile and sending its 3 MB a
#   megapixel over a slow (~2 MB/s) link.
DEADLINE_BASE_S = 120.0
DEADLINE_PER_CLICK_S = 0.25
DEADLINE_PER_MEGAPIXEL_S = 2.0
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        # gRPC watches grpc.health.v1.Health of every address and picks only SERVING ones.
        "healthCheckConfig": {"serviceName": HEALTH_SERVICE},
    }
)
ENV_TOKEN = "NUCLICK_BRIDGE_TOKEN"
ENV_CA = "NUCLICK_BRIDGE_CA"
DEFAULT_MAX_TILE = 2048

__all__ = [
    "DEFAULT_TARGET",
    "NuClickClient",
    "RemoteSegmenter",
    "ServedModelInfo",
    "ServerError",
    "ServerInfo",
    "TileJob",
    "call_deadline",
    "plan_tiles",
    "segment",
]


class ServerError(BridgeInputError):
    """The server refused a call or could not be reached; ``code`` is the
    gRPC status name (e.g. ``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ServedModelInfo:
    """One model a server holds: ``name`` is what a request asks for it by
    (``model=`` of :class:`NuClickClient`); the rest is the weights file's own
    name, version and settings."""

    name: str
    model_name: str
    model_version: str
    sha256: str
    arch: str
    patch_size: int
    sigma: float
    threshold: float
    pixel_size_um: float


@dataclass(frozen=True)
class ServerInfo:
    """What ``GetModelInfo`` says: the model this client uses (the one its
    ``model`` names, else the server's default), where it runs, the limits,
    and every model the server holds (``models``; empty from a server older
    than named models)."""

    model_name: str
    model_version: str
    sha256: str
    patch_size: int
    sigma: float
    threshold: float
    pixel_size_um: float
    device: str
    device_name: str
    server_version: str
    limits: dict[str, Any]
    served_name: str = "default"
    models: tuple[ServedModelInfo, ...] = ()


def _served(name: str, m: pb.Model) -> ServedModelInfo:
    return ServedModelInfo(
        name, m.name, m.version, m.sha256, m.arch, m.patch_size, m.sigma, m.threshold, m.pixel_size_um
    )


@dataclass
class TileJob:
    """One tile for :meth:`NuClickClient.segment_many`.

    ``image`` may be a callable returning the array, so that pixels are read
    only when the tile is sent.  ``context`` clicks guide and bound the
    nuclei of ``clicks`` (see ``Click.context_only`` in the proto) and get no
    result; their ids must not collide with those of ``clicks``.
    """

    image: np.ndarray | Callable[[], np.ndarray]
    clicks: Sequence[Click]
    origin: tuple[float, float] = (0.0, 0.0)
    downsample: float = 1.0
    pixel_size_um: float | None = None
    context: Sequence[Click] = ()
    order: Sequence[int] | None = None  # optional send order over clicks + context (tie-breaks)
    request_id: str = ""


def _transport_hint(detail: str, tls: bool) -> str:
    """What gRPC's transport error most likely means for a user of ``--server``
    (its own words name the symptom, not the mistake)."""
    if "ALPN" in detail or "Failed parsing HTTP/2" in detail or "SETTINGS frame" in detail:
        return (
            "; is this the server's HTTP port? --server takes its gRPC port "
            "('nuclick-bridge serve --port', default 50051)"
        )
    if tls and "WRONG_VERSION_NUMBER" in detail:
        return f"; the server does not use TLS on this port: unset {ENV_CA}, or check that this is its gRPC port"
    if tls and "CERTIFICATE_VERIFY_FAILED" in detail:
        return f"; the server's certificate is not trusted: set {ENV_CA} to the PEM CA bundle that signed it"
    if not tls and "Socket closed" in detail:
        return f"; if the server uses TLS ('serve --tls-cert'), set {ENV_CA} to the PEM CA bundle of its certificate"
    return ""


def call_deadline(clicks: int = 0, megapixels: float = 0.0, in_flight: int = 1) -> float:
    """The default deadline, in seconds, of a call that segments ``clicks``
    clicks (context included) on a tile of ``megapixels``, while ``in_flight``
    such calls of this client are out at once.

    Why it scales: a fixed deadline fails big tiles on slow servers (a tile of
    a thousand clicks on a loaded one-thread replica outlasted 120 s) and is
    needlessly long for nothing.  Why times ``in_flight``: the server queues
    calls, and the last of this client's tiles may wait for all the others
    before its own work starts.  Constants: see DEADLINE_BASE_S."""
    work = max(0, clicks) * DEADLINE_PER_CLICK_S + max(0.0, megapixels) * DEADLINE_PER_MEGAPIXEL_S
    return DEADLINE_BASE_S + max(1, in_flight) * work


def _detail(err: grpc.RpcError) -> str:
    return (err.details() if hasattr(err, "details") else "") or str(err)


def _too_large(detail: str) -> bool:
    """gRPC's words for a message over the size limit (either side): permanent."""
    low = detail.lower()
    return any(w in low for w in TOO_LARGE_WORDS)


def _retry_after_s(err: grpc.RpcError) -> float | None:
    """The server's ``retry-after-ms`` trailing metadata, in seconds; None
    when absent or not a number >= 0."""
    try:
        metadata = err.trailing_metadata() or ()
    except Exception:  # an error raised before any call existed has none
        return None
    for key, value in metadata:
        if key.lower() == RETRY_AFTER_KEY:
            try:
                ms = float(value.decode() if isinstance(value, bytes) else value)
            except ValueError:
                return None
            return ms / 1000.0 if math.isfinite(ms) and ms >= 0 else None
    return None


def _busy(code: grpc.StatusCode | None, detail: str, hint: float | None) -> bool:
    """Whether a RESOURCE_EXHAUSTED says "busy now, retry" rather than a limit
    no retry can meet (see BUSY_WORDS)."""
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or _too_large(detail):
        return False
    return hint is not None or any(w in detail.lower() for w in BUSY_WORDS)


def _backoff(base: float, attempt: int, cap: float) -> float:
    """Exponential backoff with equal jitter: between half and all of
    ``base * 2**attempt`` (at most ``cap``), so clients refused together do
    not all come back together."""
    full = min(base * 2 ** min(attempt, 30), cap)
    return full / 2 + random.uniform(0.0, full / 2)


def _busy_pause(hint: float | None, base: float, attempt: int, cap: float) -> float:
    """The pause before asking a busy server again: its hint, never less, plus
    up to a quarter more (jitter); without a hint, :func:`_backoff`.  A hint
    under ``base`` counts as ``base``: a server answering "0 ms" must not be
    asked in a tight loop."""
    if hint is not None:
        return max(hint, base) * random.uniform(1.0, 1.25)
    return _backoff(base, attempt, max(cap, BUSY_MAX_BACKOFF_S))


def _rpc_error(target: str, err: grpc.RpcError, tls: bool = False, timeout: float | None = None) -> ServerError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    name = code.name if code is not None else "UNKNOWN"
    detail = _detail(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = _transport_hint(detail, tls)
        return ServerError(name, f"cannot reach the NuClick server at {target} ({detail}){hint}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = "in time" if timeout is None else f"within {timeout:g} s"
        return ServerError(
            name,
            f"the NuClick server at {target} did not answer {within} ({detail}); a slow or loaded server needs "
            "a longer deadline: --timeout SECONDS, or fewer tiles at once (--concurrency)",
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _too_large(detail):
        return ServerError(
            name,
            f"NuClick server {target}: {name}: {detail}; a message is over the size limit "
            "('serve --max-message-mb' on the server)",
        )
    if _busy(code, detail, _retry_after_s(err)):
        within = "" if timeout is None else f" for this call's deadline of {timeout:g} s"
        return ServerError(
            name,
            f"the NuClick server at {target} stayed busy{within} ({detail}); retry later, give a longer "
            "--timeout, send fewer tiles at once (--concurrency) or add replicas",
        )
    return ServerError(name, f"NuClick server {target}: {name}: {detail}")


def _read_bytes(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    p = Path(value)
    if not p.is_file():
        raise BridgeInputError(f"CA certificate file not found: {p}")
    return p.read_bytes()


class NuClickClient:
    """A channel to one server or a set of replicas (``target``: see
    :mod:`bridge.targets`).  Thread-safe; reuse it for many calls.

    ``tls=True`` (or ``root_certificates``, a PEM path or bytes) uses TLS;
    ``token`` adds ``authorization: Bearer <token>`` to every call.
    ``timeout`` is the deadline of every call in seconds, retries included;
    None (the default) scales it with each call's work (:func:`call_deadline`:
    never under the former fixed default of 120 s).  ``retries``: how many
    times a call is sent again while the server is UNAVAILABLE; a busy server
    is asked again until the deadline, never sooner than it asks.
    ``concurrency``: tiles in flight at once in :meth:`segment_tiled`.
    ``model``: the name of the server's model every tile goes to ("": its
    default).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        timeout: float | None = None,
        retries: int = 6,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        max_message_bytes: int = 256 << 20,
        encoding: str = "raw",
        concurrency: int = DEFAULT_CONCURRENCY,
        model: str = "",
    ) -> None:
        parsed = parse_target(target)
        if concurrency < 1:
            raise BridgeInputError(f"--concurrency must be at least 1, not {concurrency}")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise BridgeInputError(f"--timeout must be a positive number of seconds, not {timeout:g}")
        self.target = parsed.text
        self.grpc_target = parsed.grpc
        self.concurrency = int(concurrency)
        self.model = (model or "").strip()
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.encoding = encoding
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Reconnect quickly after a server restart.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # Spread calls over every address, only to replicas whose health is SERVING.
            ("grpc.service_config", SERVICE_CONFIG),
            # Transparent retries of calls that never reached a server; tiles that did are
            # sent again by this client (gRPC's own retry buffer is smaller than a tile).
            ("grpc.enable_retries", 1),
        ]
        roots = _read_bytes(root_certificates)
        self.tls = bool(tls or roots is not None)
        if self.tls:
            creds = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(parsed.grpc, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(parsed.grpc, options=options)
        self._stub = pb_grpc.NuClickStub(self._channel)
        self._info: ServerInfo | None = None
        # Calls sent again, over this client's life: all of them, and those because the server was busy.
        self.retry_count = 0
        self.busy_retry_count = 0
        self._count_lock = threading.Lock()

    @classmethod
    def from_env(cls, target: str = DEFAULT_TARGET, **kwargs) -> NuClickClient:
        """Token from ``NUCLICK_BRIDGE_TOKEN``, TLS with the CA bundle at
        ``NUCLICK_BRIDGE_CA``, unless given as arguments."""
        kwargs.setdefault("token", os.environ.get(ENV_TOKEN) or None)
        ca = os.environ.get(ENV_CA)
        if ca and "root_certificates" not in kwargs:
            kwargs["root_certificates"] = ca
        return cls(target, **kwargs)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> NuClickClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ calling

    def deadline_for(self, request: Any = None, in_flight: int = 1) -> float:
        """The deadline, in seconds, of one call with ``request``: the client's
        ``timeout`` when set, else :func:`call_deadline` of the request's clicks
        and tile (a call without a tile gets the base)."""
        if self.timeout is not None:
            return float(self.timeout)
        if isinstance(request, pb.SegmentRequest):
            megapixels = request.tile.width * request.tile.height / 1e6
            return call_deadline(len(request.clicks), megapixels, in_flight)
        return call_deadline(in_flight=in_flight)

    def _count(self, busy: bool) -> None:
        with self._count_lock:
            self.retry_count += 1
            self.busy_retry_count += int(busy)

    def _call(
        self,
        method,
        request,
        timeout: float | None,
        stop: threading.Event | None = None,
        in_flight: int = 1,
    ):
        """One call within its deadline (``timeout``, else :meth:`deadline_for`),
        sent again after a transient error (at most ``retries`` times, with
        backoff) and while the server is busy (until the deadline, honouring
        its ``retry-after-ms``).  ``stop`` (the run was abandoned: another tile
        failed, Ctrl-C) cancels the call in flight, so the server drops its
        work, and ends the retrying."""
        timeout = self.deadline_for(request, in_flight) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        attempt = busy_attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                if stop is None:
                    return method(request, timeout=max(remaining, 0.001), metadata=self._metadata)
                return _cancellable(method, request, max(remaining, 0.001), self._metadata, stop)
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                remaining = deadline - time.monotonic()
                hint = _retry_after_s(err)
                busy = _busy(code, _detail(err), hint)
                if busy:
                    pause = _busy_pause(hint, self.backoff, busy_attempt, self.max_backoff)
                    busy_attempt += 1
                    if pause >= remaining:  # the server asks for longer than this call has left
                        raise _rpc_error(self.target, err, self.tls, timeout) from None
                elif code in TRANSIENT and attempt < self.retries and remaining > 0:
                    pause = min(_backoff(self.backoff, attempt, self.max_backoff), remaining)
                    attempt += 1
                else:
                    raise _rpc_error(self.target, err, self.tls, timeout) from None
                if stop is not None and stop.wait(pause):
                    raise _rpc_error(self.target, err, self.tls, timeout) from None
                if stop is None:
                    time.sleep(pause)
                self._count(busy)

    def info(self, timeout: float | None = None, refresh: bool = False) -> ServerInfo:
        """The server's model (the one ``model`` names), device and limits
        (cached after the first call).  A name the server does not hold is a
        :class:`ServerError` naming the ones it has, before any tile is sent."""
        if self._info is None or refresh:
            r = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
            lim = r.limits
            models = tuple(_served(m.name, m.model) for m in r.models)
            chosen = _served(self.model or "default", r.model)
            if self.model:
                by_name = {m.name: m for m in models}
                if not models:
                    raise ServerError(
                        "FAILED_PRECONDITION",
                        f"NuClick server {self.target} (nuclick-bridge {r.server_version or 'unknown'}) serves one "
                        f"model and cannot choose {self.model!r}: upgrade it, or leave out the model name",
                    )
                if self.model not in by_name:
                    raise ServerError(
                        "INVALID_ARGUMENT",
                        f"NuClick server {self.target} has no model named {self.model!r}; "
                        f"its models are: {', '.join(by_name)}",
                    )
                chosen = by_name[self.model]
            self._info = ServerInfo(
                model_name=chosen.model_name,
                model_version=chosen.model_version,
                sha256=chosen.sha256,
                patch_size=chosen.patch_size,
                sigma=chosen.sigma,
                threshold=chosen.threshold,
                pixel_size_um=chosen.pixel_size_um,
                device=r.device,
                device_name=r.device_name,
                server_version=r.server_version,
                limits={f.name: getattr(lim, f.name) for f in lim.DESCRIPTOR.fields},
                served_name=chosen.name,
                models=models,
            )
        return self._info

    # ------------------------------------------------------------ segment

    def segment(
        self,
        image: np.ndarray,
        clicks: Sequence[Click],
        *,
        origin: tuple[float, float] = (0.0, 0.0),
        downsample: float = 1.0,
        pixel_size_um: float | None = None,
        context: Sequence[Click] = (),
        simplify_tolerance: float | None = None,
        encoding: str | None = None,
        timeout: float | None = None,
        request_id: str = "",
    ) -> list[NucleusResult]:
        """One tile: one result per click, in click order (polygons in level 0)."""
        job = TileJob(image, clicks, origin, downsample, pixel_size_um, context, None, request_id)
        req = self._request(job, encoding, simplify_tolerance)
        resp = self._call(self._stub.Segment, req, timeout)
        return self._results(resp, job)

    def segment_many(
        self,
        jobs: Iterable[TileJob],
        *,
        simplify_tolerance: float | None = None,
        encoding: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[list[NucleusResult]]:
        """Many tiles over one ``SegmentStream``: results per job, in order,
        while the next tiles are being sent.  If the server becomes
        UNAVAILABLE mid-stream, the unanswered tiles are sent again on a new
        stream (up to ``retries`` times in a row); if it is busy (no stream
        slot, or a tile refused as busy), they are sent again after its
        ``retry-after-ms`` or a jittered backoff, until the deadline, or, with
        none, after BUSY_STREAM_WAIT_S of busy answers in a row.  ``timeout``:
        deadline of the whole stream (default: none)."""
        jobs = list(jobs)
        done = 0
        attempt = busy_attempt = 0
        busy_since: float | None = None
        deadline = None if timeout is None else time.monotonic() + timeout
        failed: list[BaseException] = []  # an error while preparing a tile (reading pixels), raised here
        while done < len(jobs):
            pending = jobs[done:]

            def requests(pending=pending, first=done):
                try:
                    for k, job in enumerate(pending):
                        if not job.request_id:
                            job.request_id = str(first + k)
                        yield self._request(job, encoding, simplify_tolerance)
                except Exception as exc:  # grpc would only say CANCELLED; keep the real reason
                    failed.append(exc)

            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            call = self._stub.SegmentStream(requests(), timeout=remaining, metadata=self._metadata)
            busy = False
            hint: float | None = None
            error: ServerError | None = None
            try:
                for resp in call:
                    job = jobs[done]
                    if resp.HasField("error"):
                        code, message = resp.error.code, resp.error.message
                        error = ServerError(code, f"NuClick server {self.target}: {code}: {message}")
                        if code == "RESOURCE_EXHAUSTED" and _busy(grpc.StatusCode.RESOURCE_EXHAUSTED, message, None):
                            busy = True  # this tile and the rest go again on a new stream
                            break
                        raise error
                    if resp.request_id != job.request_id:
                        raise ServerError(
                            "INTERNAL", f"server answered request {resp.request_id!r}, expected {job.request_id!r}"
                        )
                    results = self._results(resp, job)
                    done += 1
                    attempt = busy_attempt = 0
                    busy_since = None
                    yield results
                else:
                    if failed:
                        raise failed[0]
                    if done < len(jobs):
                        raise ServerError("INTERNAL", f"the stream ended after {done} of {len(jobs)} tiles")
            except grpc.RpcError as err:
                if failed:
                    raise failed[0] from None
                code = err.code() if hasattr(err, "code") else None
                hint = _retry_after_s(err)
                busy = _busy(code, _detail(err), hint)
                error = _rpc_error(self.target, err, self.tls, timeout)
                if not busy and (code not in TRANSIENT or attempt >= self.retries):
                    raise error from None
            finally:
                call.cancel()
            if error is None:
                continue  # every tile answered
            now = time.monotonic()
            if busy:
                busy_since = now if busy_since is None else busy_since
                pause = _busy_pause(hint, self.backoff, busy_attempt, self.max_backoff)
                busy_attempt += 1
                end = deadline if deadline is not None else busy_since + BUSY_STREAM_WAIT_S
            else:
                pause = _backoff(self.backoff, attempt, self.max_backoff)
                attempt += 1
                end = deadline
            if end is not None and now + pause >= end:
                raise error
            time.sleep(pause)
            self._count(busy)

    def segment_parallel(
        self,
        jobs: Iterable[TileJob],
        *,
        concurrency: int | None = None,
        simplify_tolerance: float | None = None,
        encoding: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[tuple[int, list[NucleusResult]]]:
        """Many tiles as separate ``Segment`` calls, up to ``concurrency`` in
        flight, so that round_robin spreads them over the replicas; yields
        ``(index of the job, its results)`` as tiles complete.  Pixels are read
        (``TileJob.image`` called) in the calling thread only, one tile at a
        time: readers need not be thread-safe.  Each tile is retried on its own
        (:meth:`_call`), so a replica that dies costs only its tiles in flight.
        Each tile's deadline: ``timeout``, else the client's, else
        :func:`call_deadline` with ``concurrency`` tiles in flight."""
        n = self.concurrency if concurrency is None else int(concurrency)
        if n < 1:
            raise BridgeInputError(f"--concurrency must be at least 1, not {n}")
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nuclick-client")
        inflight: dict[Future, tuple[int, TileJob]] = {}

        def finished(block_until: int) -> Iterator[tuple[int, list[NucleusResult]]]:
            while len(inflight) > block_until:
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: inflight[f][0]):
                    k, job = inflight.pop(fut)
                    yield k, self._results(fut.result(), job)

        try:
            for k, job in enumerate(jobs):
                if not job.request_id:
                    job.request_id = str(k)
                req = self._request(job, encoding, simplify_tolerance)
                inflight[pool.submit(self._call, self._stub.Segment, req, timeout, stop, n)] = (k, job)
                yield from finished(n - 1)
            yield from finished(0)
        finally:
            stop.set()  # an error (or an abandoned iterator): no more retries, nothing new starts
            pool.shutdown(wait=False, cancel_futures=True)

    def _request(self, job: TileJob, encoding: str | None, tolerance: float | None) -> pb.SegmentRequest:
        image = job.image() if callable(job.image) else job.image
        req = pb.SegmentRequest(
            tile=tile_to_pb(image, job.origin, job.downsample, job.pixel_size_um, encoding or self.encoding),
            request_id=job.request_id,
            model_name=self.model,
        )
        items = [(c, False) for c in job.clicks] + [(c, True) for c in job.context]
        order = job.order if job.order is not None else range(len(items))
        req.clicks.extend(click_to_pb(*items[k]) for k in order)
        if tolerance is not None:
            req.simplify_tolerance = tolerance
        return req

    def _results(self, resp: pb.SegmentResponse, job: TileJob) -> list[NucleusResult]:
        if self.model and resp.model_name != self.model:
            # A server older than named models ignores the name and answers with its only model.
            raise ServerError(
                "FAILED_PRECONDITION",
                f"NuClick server {self.target} answered with model {resp.model_name or resp.model!r}, "
                f"not {self.model!r}: it cannot choose models; upgrade it, or leave out the model name",
            )
        by_id = {r.click_id: r for r in resp.results}
        out = []
        for c in job.clicks:
            r = by_id.get(str(c.id))
            if r is None:
                raise ServerError("INTERNAL", f"the server's reply has no result for click {c.id!r}")
            out.append(result_from_pb(r, c))
        return out

    # ----------------------------------------------------- whole images

    def segment_tiled(
        self,
        reader: RegionReader,
        clicks: Sequence[Click],
        *,
        max_tile: int = DEFAULT_MAX_TILE,
        simplify_tolerance: float | None = None,
        progress: bool = False,
        concurrency: int | None = None,
    ):
        """Every click of an image, read tile by tile around the clicks, with
        ``concurrency`` tiles in flight (default: the client's): the same
        :class:`bridge.nuclick.segmentation.Segmentation` (results in click order;
        ``masks`` are not sent back, so all None) as the in-process engine
        gives on the whole image, also at tile borders, whichever replica
        answers which tile."""
        from bridge.nuclick.segmentation import Segmentation

        clicks = list(clicks)
        tiles = self.iter_tiled(
            reader,
            clicks,
            max_tile=max_tile,
            simplify_tolerance=simplify_tolerance,
            progress=progress,
            concurrency=concurrency,
        )
        return Segmentation.collect(len(clicks), ((k, r, None) for k, r in tiles))

    def iter_tiled(
        self,
        reader: RegionReader,
        clicks: Sequence[Click],
        *,
        max_tile: int = DEFAULT_MAX_TILE,
        simplify_tolerance: float | None = None,
        progress: bool = False,
        concurrency: int | None = None,
    ) -> Iterator[tuple[int, NucleusResult]]:
        """:meth:`segment_tiled`'s results as tiles complete: ``(click index,
        result)``, one per click, in no fixed order.  Nothing is kept per
        click once yielded, and only ``concurrency`` tiles' pixels are in
        memory at once, so a slide with any number of clicks runs in bounded
        memory (each tile's answer is final: the server resolves its overlaps
        against the context clicks sent with it)."""
        from tqdm import tqdm

        from bridge.nuclick.segmentation import check_finite, outside_reasons

        clicks = list(clicks)
        check_finite(clicks)
        info = self.info()
        max_tile = min(max_tile, int(info.limits["max_tile_side"]))
        plans = plan_tiles(
            clicks,
            reader.width,
            reader.height,
            info.patch_size,
            info.sigma,
            max_tile,
            int(info.limits["max_clicks_per_request"]),
        )
        for k, why in sorted(outside_reasons(clicks, reader.width, reader.height).items()):
            yield k, NucleusResult(click=clicks[k], found=False, reason=why)

        def job(plan: TilePlan) -> TileJob:
            def pixels(plan=plan) -> np.ndarray:
                return reader.read_region(plan.x0, plan.y0, plan.width, plan.height)

            ids = {k: f"{k}" for k in plan.members + plan.context}
            send = sorted(plan.members + plan.context)
            position = {k: i for i, k in enumerate(plan.members + plan.context)}
            return TileJob(
                pixels,
                [_with_id(clicks[k], ids[k]) for k in plan.members],
                (plan.x0, plan.y0),
                context=[_with_id(clicks[k], ids[k]) for k in plan.context],
                order=[position[k] for k in send],
            )

        bar = tqdm(total=len(plans), desc="tiles", unit="tile", disable=not progress, leave=False)
        tiles = self.segment_parallel(map(job, plans), concurrency=concurrency, simplify_tolerance=simplify_tolerance)
        try:
            for i, tile_results in tiles:
                for k, r in zip(plans[i].members, tile_results, strict=True):
                    r.click = clicks[k]
                    yield k, r
                bar.update(1)
        finally:
            bar.close()

    def health(self, timeout: float = 5.0) -> str:
        """The gRPC health status of the NuClick service ("SERVING", ...)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        req = health_pb2.HealthCheckRequest(service="nuclick.v1.NuClick")
        resp = self._call(stub.Check, req, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _cancellable(method, request, timeout: float, metadata, stop: threading.Event):
    """A unary call that ``stop`` cancels; its result, or its RpcError."""
    call = method.future(request, timeout=timeout, metadata=metadata)
    done = threading.Event()
    call.add_done_callback(lambda _: done.set())
    while not done.wait(0.1):
        if stop.is_set():
            call.cancel()
            raise ServerError("CANCELLED", "the run was stopped before this tile was answered")
    return call.result()


def check_concurrency(args) -> int:
    """A command's ``--concurrency`` (default :data:`DEFAULT_CONCURRENCY`), checked."""
    n = getattr(args, "concurrency", None)
    n = DEFAULT_CONCURRENCY if n is None else n
    if not 1 <= n <= 256:
        raise BridgeInputError(f"--concurrency must be between 1 and 256, not {n}")
    return int(n)


def _with_id(click: Click, new_id: str) -> Click:
    return Click(click.x, click.y, new_id, click.class_name)


# ----------------------------------------------------------------- tiling


@dataclass(frozen=True)
class TilePlan:
    """A level-0 window (clipped to the image), the clicks it answers for
    (``members``) and the neighbours sent as context (indices into the clicks)."""

    x0: int
    y0: int
    width: int
    height: int
    members: list[int] = field(default_factory=list)
    context: list[int] = field(default_factory=list)


def plan_tiles(
    clicks: Sequence[Click],
    width: int,
    height: int,
    patch_size: int = 128,
    sigma: float = 2.0,
    max_tile: int = DEFAULT_MAX_TILE,
    max_clicks: int = 1000,
) -> list[TilePlan]:
    """Group the on-image clicks into server requests whose answers equal a
    whole-image run.

    A member's final mask depends on its own patch, on the neighbours whose
    guidance reaches into it (within ``patch_size/2 + 4 sigma + 1`` px,
    Chebyshev) and on the raw masks of the neighbours whose patches overlap
    it (within ``patch_size`` px), which in turn depend on their own guidance
    neighbours.  So each request carries, as context, every click within
    ``patch_size`` of a member (their patches lie inside the tile) and every
    click within guidance reach of those; the tile covers the patches of
    members and overlapping neighbours, clipped to the image.
    """
    if max_tile < 4 * patch_size:
        raise BridgeInputError(f"tiles must be at least {4 * patch_size} px a side for patches of {patch_size} px")
    xy = np.array([[c.x, c.y] for c in clicks], dtype=np.float64).reshape(-1, 2)
    if len(xy) == 0:
        return []
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
    tree = cKDTree(xy)
    overlap = float(patch_size)
    reach = patch_size / 2 + 4 * sigma + 1
    origins = np.array([patch_origin(x, y, patch_size) for x, y in xy], dtype=np.int64).reshape(-1, 2)
    cell = max_tile - 2 * (patch_size + patch_size // 2 + 2)

    def near(indices: list[int], r: float) -> set[int]:
        out: set[int] = set()
        for found in tree.query_ball_point(xy[indices], r=r, p=np.inf):
            out.update(found)
        return out

    def plan(members: list[int]) -> TilePlan:
        ring1 = near(members, overlap) - set(members)
        ring2 = near(members + sorted(ring1), reach) - set(members) - ring1
        box = [k for k in members + sorted(ring1) if inside[k]]
        o = origins[box]
        x0, y0 = max(0, int(o[:, 0].min())), max(0, int(o[:, 1].min()))
        x1 = min(width, int(o[:, 0].max()) + patch_size)
        y1 = min(height, int(o[:, 1].max()) + patch_size)
        return TilePlan(x0, y0, x1 - x0, y1 - y0, sorted(members), sorted(ring1 | ring2))

    def split(members: list[int], size: float) -> list[TilePlan]:
        bins: dict[tuple[int, int], list[int]] = {}
        for k in members:
            bins.setdefault((math.floor(xy[k, 0] / size), math.floor(xy[k, 1] / size)), []).append(k)
        out = []
        for key in sorted(bins):
            p = plan(bins[key])
            if len(p.members) + len(p.context) > max_clicks:
                if size <= 1 or len(p.members) == 1:
                    raise BridgeInputError(
                        f"{len(p.members) + len(p.context)} clicks crowd one {patch_size} px patch "
                        f"near ({xy[p.members[0], 0]:.0f}, {xy[p.members[0], 1]:.0f}); the server takes "
                        f"{max_clicks} per request"
                    )
                out.extend(split(p.members, size / 2))
            else:
                out.append(p)
        return out

    return split(np.nonzero(inside)[0].tolist(), float(cell))


# ---------------------------------------------------------- conveniences


def segment(
    image: np.ndarray,
    clicks: Sequence[Click],
    server: str = DEFAULT_TARGET,
    **kwargs,
) -> list[NucleusResult]:
    """One tile through a server, in one call: opens a connection, segments,
    closes.  ``kwargs`` go to :meth:`NuClickClient.segment` (origin,
    downsample, pixel_size_um, ...) or, for token/tls/timeout/retries, to the
    client."""
    client_keys = {"token", "tls", "root_certificates", "retries", "backoff", "max_backoff", "model"}
    client_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in client_keys}
    with NuClickClient.from_env(server, **client_kw) as client:
        return client.segment(image, clicks, **kwargs)


class RemoteSegmenter:
    """The in-process engine's interface (``segment``, ``segment_tiled``)
    backed by a server, for the CLI and the connectors' ``--server``."""

    def __init__(self, client: NuClickClient, simplify_tolerance: float | None = None) -> None:
        self.client = client
        self.tolerance = simplify_tolerance

    @classmethod
    def from_args(cls, args) -> RemoteSegmenter:
        """From a command's ``--server`` (one server, a list, or a gRPC target
        URI), ``--concurrency``, ``--model-name``, ``--timeout`` (None: scaled
        with each tile's work) and ``--tolerance``; refuses flags that only
        make sense in-process."""
        if getattr(args, "method", "nuclick") != "nuclick":
            raise BridgeInputError("--server runs NuClick on the server; --method watershed runs only locally")
        for flag in ("weights", "threshold"):
            if getattr(args, flag, None) is not None:
                raise BridgeInputError(f"--{flag} is set on the server ('nuclick-bridge serve --{flag}'), not here")
        parse_target(args.server)  # a bad target is one line before anything connects
        model = getattr(args, "model_name", None) or ""
        kwargs: dict[str, Any] = {"concurrency": check_concurrency(args), "model": model}
        if getattr(args, "timeout", None) is not None:  # else the client's default: scaled with the work
            kwargs["timeout"] = float(args.timeout)
        client = NuClickClient.from_env(str(args.server), **kwargs)
        return cls(client, getattr(args, "tolerance", None))

    def segment(self, reader: RegionReader, clicks: Sequence[Click], progress: bool = False):
        return self.segment_tiled(reader, clicks, progress=progress)

    def segment_tiled(
        self,
        reader: RegionReader,
        clicks: Sequence[Click],
        max_tile: int = DEFAULT_MAX_TILE,
        progress: bool = False,
    ):
        """As the engine's: same answer as a whole-image run.  Tiles are at
        least 4 patches a side here (room for the context clicks), whatever
        ``max_tile`` asks."""
        max_tile = max(int(max_tile), 4 * self.client.info().patch_size)
        return self.client.segment_tiled(
            reader, clicks, max_tile=max_tile, simplify_tolerance=self.tolerance, progress=progress
        )

    def iter_tiled(
        self,
        reader: RegionReader,
        clicks: Sequence[Click],
        max_tile: int = DEFAULT_MAX_TILE,
        progress: bool = False,
        with_masks: bool = False,
    ) -> Iterator[tuple[int, NucleusResult, None]]:
        """As the engine's: ``(click index, result, None)`` as tiles complete
        (no masks come back from a server), in bounded memory."""
        max_tile = max(int(max_tile), 4 * self.client.info().patch_size)
        tiles = self.client.iter_tiled(
            reader, clicks, max_tile=max_tile, simplify_tolerance=self.tolerance, progress=progress
        )
        for k, r in tiles:
            yield k, r, None

    def close(self) -> None:
        self.client.close()
