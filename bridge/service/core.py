"""What the server does, whatever the transport: check a request, take the
model it names, decode its tile, bring it to the model's scale, segment
through that model's shared batcher, and answer in level-0 coordinates.  gRPC (:mod:`bridge.service.server`) and
HTTP/JSON (:mod:`bridge.service.http`) are thin adapters over
:class:`SegmentService`.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree
from shapely import affinity

from bridge import __version__
from bridge.errors import BridgeInputError
from bridge.io.coords import level0_affine, to_local
from bridge.io.imageio import ArrayReader
from bridge.nuclick.segmentation import outside_reasons
from bridge.results import Click
from bridge.service.batching import Batcher, Cancelled, ShuttingDown
from bridge.service.convert import ServiceError, decode_tile, invalid, result_to_pb, too_big
from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.logs import clip
from bridge.service.metrics import ServiceMetrics
from bridge.service.models import DEFAULT_MODEL, ModelSet, ReloadResult, ServedModel, UnknownModel

log = logging.getLogger("bridge.service")

# A request's pixel size may differ this much (relative) from the model's
# before the tile is resampled.
PIXEL_SIZE_TOLERANCE = 0.10
MAX_TOLERANCE_PX = 10.0
MIN_DOWNSAMPLE, MAX_DOWNSAMPLE = 1e-3, 1e4
MAX_PIXEL_SIZE_UM = 1e4
MAX_RESAMPLE = 64.0
# What a stream ends with when something unexpected fails in it (the details go to the log).
INTERNAL_STREAM = "internal error in the stream; see the server log"
# Longest request_id accepted (characters); a longer one is INVALID_ARGUMENT.  Ids are
# echoed in answers and written in log lines, so the client must not choose their size.
MAX_REQUEST_ID = 128
# Client-chosen strings (request ids, model names) are cut to this in log lines.
LOG_FIELD_CHARS = 128
# Bounds of the retry_after hint of a busy refusal, in seconds.
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 0.5, 30.0


@dataclass
class Limits:
    """What one request (and the server as a whole) may ask for."""

    max_message_bytes: int = 64 << 20
    max_tile_side: int = 4096
    max_clicks_per_request: int = 1000
    max_concurrent_streams: int = 8
    max_batch: int = 32
    batch_wait_ms: float = 2.0
    stream_window: int = 4
    # Unary calls that may wait for a compute slot when every slot is taken;
    # beyond them a call is refused at once (RESOURCE_EXHAUSTED with retry_after).
    max_queued_calls: int = 512
    # A stream that sends nothing for this long is ended (DEADLINE_EXCEEDED); 0: never.
    stream_idle_timeout_s: float = 60.0

    def check(self) -> None:
        for name in ("max_message_bytes", "max_tile_side", "max_clicks_per_request", "max_batch", "stream_window"):
            if getattr(self, name) < 1:
                raise BridgeInputError(f"{name.replace('_', '-')} must be at least 1")
        if self.max_concurrent_streams < 0:
            raise BridgeInputError("max-concurrent-streams must be >= 0")
        if self.max_queued_calls < 0:
            raise BridgeInputError("queue must be >= 0")
        if not (math.isfinite(self.stream_idle_timeout_s) and self.stream_idle_timeout_s >= 0):
            raise BridgeInputError("stream-idle-timeout must be >= 0 seconds (0: never)")
        if not (0 <= self.batch_wait_ms <= 1000):
            raise BridgeInputError("batch-wait-ms must be between 0 and 1000")


def log_event(msg: str, level: int = logging.INFO, **fields) -> None:
    log.log(level, msg, extra={"fields": fields})


class _Ticket:
    """One call's place in :class:`Admission`: waiting, granted (holds a slot), refused or done."""

    __slots__ = ("granted_at", "ready", "state")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.state = "waiting"
        self.granted_at = 0.0

    def grant(self) -> None:
        self.state = "granted"
        self.granted_at = time.monotonic()
        self.ready.set()


class Admission:
    """At most ``slots`` calls compute at once; up to ``queue`` more wait for a
    slot, first come first served; beyond that, :meth:`enter` says no.

    Why here and not in the transports: gRPC's own ``maximum_concurrent_rpcs``
    refuses at once, with no queue and nothing counted, and HTTP has no limit
    of its own.  Both transports call :meth:`SegmentService.segment`, so a busy
    server makes every caller wait (bounded by the queue, the call's cancel
    event and its deadline), and refuses, counted and logged, only when the
    queue is full.
    """

    POLL_S = 0.05  # how often a waiting call looks at its cancel event and deadline

    def __init__(self, slots: int, queue: int) -> None:
        if slots < 1:
            raise BridgeInputError("workers must be at least 1")
        self.slots = slots
        self.queue = queue
        self._lock = threading.Lock()
        self._computing = 0
        self._waiting: deque[_Ticket] = deque()
        self._mean_s: float | None = None  # moving mean of the time a slot is held

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def computing(self) -> int:
        return self._computing

    def enter(self) -> _Ticket | None:
        """A ticket that holds a slot or waits in the queue; None when the queue is full."""
        ticket = _Ticket()
        with self._lock:
            if self._computing < self.slots:  # a free slot means nobody waits
                self._computing += 1
                ticket.grant()
            elif len(self._waiting) < self.queue:
                self._waiting.append(ticket)
            else:
                return None
        return ticket

    def wait(self, ticket: _Ticket, cancel: threading.Event | None, deadline: float | None) -> None:
        """Return once ``ticket`` holds a slot, or raise ServiceError: CANCELLED
        (``cancel`` set), DEADLINE_EXCEEDED (``deadline``, a time.monotonic()
        value, passed) or UNAVAILABLE (refused by :meth:`refuse_waiting`).
        The caller calls :meth:`leave` in every case."""
        t0 = time.monotonic()
        while not ticket.ready.wait(self.POLL_S):
            if cancel is not None and cancel.is_set():
                raise ServiceError("CANCELLED", "the call was cancelled while it waited for a compute slot")
            if deadline is not None and time.monotonic() >= deadline:
                raise ServiceError(
                    "DEADLINE_EXCEEDED",
                    f"the call's deadline passed after {time.monotonic() - t0:.1f} s waiting for a compute slot "
                    "(the server is busy)",
                )
        if ticket.state == "refused":
            raise ServiceError(
                "UNAVAILABLE", "the server is shutting down before this call could start; retry it elsewhere or later"
            )

    def leave(self, ticket: _Ticket) -> None:
        """Give the slot to the first waiting call, or leave the queue."""
        with self._lock:
            if ticket.state == "granted":
                held = time.monotonic() - ticket.granted_at
                self._mean_s = held if self._mean_s is None else 0.8 * self._mean_s + 0.2 * held
                if self._waiting:
                    self._waiting.popleft().grant()
                else:
                    self._computing -= 1
            elif ticket.state == "waiting":
                self._waiting.remove(ticket)
            ticket.state = "done"

    def refuse_waiting(self) -> int:
        """Refuse every waiting call (UNAVAILABLE: none has started, so a retry
        is safe); how many there were."""
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            for ticket in waiting:
                ticket.state = "refused"
                ticket.ready.set()
        return len(waiting)

    def retry_after(self) -> float:
        """Seconds until a refused call may find room: the time the queue takes
        to move by one place per slot, from the mean time a slot is held."""
        with self._lock:
            mean, waiting = self._mean_s, len(self._waiting)
        if mean is None:
            return 1.0
        return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, mean * (waiting + 1) / self.slots))


@dataclass
class _Prepared:
    array: np.ndarray
    clicks: list[Click]  # in the array's frame
    answer: list[int]  # indices of clicks that get a result (not context_only)
    origin: tuple[float, float]
    scale: tuple[float, float]  # level-0 px per array px, (x, y)
    factor: float  # tile px per model px after resampling (1 = as sent)
    tolerance: float  # simplification in array px


class _BatchedView:
    """The engine with its forward pass routed through the batcher; one per
    request, so that the request's cancel event and tolerance travel with it."""

    @staticmethod
    def make(engine, batcher: Batcher, cancel: threading.Event | None, tolerance: float):
        view = copy.copy(engine)
        view.batch_size = batcher.max_batch
        view.tolerance = tolerance

        def predict(batch: np.ndarray) -> np.ndarray:
            return batcher.run(batch, cancel)

        view.predict = predict
        return view


class SegmentService:
    """Segment requests for any number of threads, over one or several engines.

    ``engine`` is a :class:`bridge.nuclick.engine.NuClickEngine` (or anything with its
    ``segment``, ``predict``, ``info`` and ``device``), served as "default", or
    a mapping of model name -> engine that holds "default"; ``models_dir`` and
    ``load`` (path -> engine) add every ``*.pt`` of a folder by file stem,
    read again by :meth:`reload_models` (see :mod:`bridge.service.models`).
    Each model's forward pass is shared through its own :class:`Batcher`;
    everything else runs in the calling thread.  ``threads`` > 0 sets torch's
    CPU threads for the forward pass.

    ``workers`` unary calls (gRPC ``Segment``, HTTP ``/v1/segment``) compute at
    once, and ``limits.max_queued_calls`` more wait for a slot in
    :class:`Admission` (see :meth:`segment`); the tiles of open streams do not
    take these slots (they are bounded by ``max_concurrent_streams`` times
    ``stream_window``).
    """

    def __init__(
        self,
        engine,
        limits: Limits | None = None,
        auth_required: bool = False,
        threads: int = 0,
        models_dir: str | Path | None = None,
        load: Callable[[Path], Any] | None = None,
        workers: int = 32,
    ) -> None:
        self.limits = limits or Limits()
        self.limits.check()
        self.auth_required = auth_required
        self.metrics = ServiceMetrics()
        self._admission = Admission(workers, self.limits.max_queued_calls)
        self.metrics.watch_waiting(lambda: self._admission.waiting)

        def make_batcher(model) -> Batcher:
            return Batcher(
                model.predict,
                self.limits.max_batch,
                self.limits.batch_wait_ms / 1000.0,
                on_start=(lambda: _set_torch_threads(threads)) if threads else None,
                on_batch=self.metrics.batch_size.observe,
            )

        engines = dict(engine) if isinstance(engine, Mapping) else {DEFAULT_MODEL: engine}
        self.models = ModelSet(engines, make_batcher, models_dir, load)
        self.metrics.watch_queue(lambda: self.models.batch_stats()["queued_chunks"])
        default = self.models.default.engine
        self.device = getattr(default, "device", "cpu")
        self.metrics.set_model(default.info.name, default.info.version, _device_kind(self.device))
        self.metrics.set_served(self._served_labels())
        window = self.limits.stream_window
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, self.limits.max_concurrent_streams) * window, thread_name_prefix="nuclick-stream"
        )
        self._lock = threading.Lock()
        self._active_calls = 0
        self._active_streams = 0
        self._counts = {"requests": 0, "errors": 0, "cancelled": 0, "refused": 0, "streams_refused": 0}
        self._closed = False

    @property
    def engine(self):
        """The default model's engine (what a request that names no model gets)."""
        return self.models.default.engine

    def reload_models(self) -> ReloadResult:
        """Read the models folder again (on SIGHUP): requests in flight keep their model;
        a file that cannot be loaded leaves the served set as it was."""
        t0 = time.perf_counter()
        try:
            result = self.models.reload()
        except Exception as exc:  # a bug while swapping: the old set stays, the server goes on
            log.exception("models reload failed")
            result = ReloadResult(error=f"internal error: {type(exc).__name__}: {exc}")
        self.metrics.reloads.labels(result="ok" if result.ok else "failed").inc()
        if result.ok:
            self.metrics.set_served(self._served_labels())
            log_event(
                "models reloaded",
                models=self.models.names(),
                added=result.added,
                removed=result.removed,
                reloaded=result.reloaded,
                ms=round(1000 * (time.perf_counter() - t0), 1),
            )
        else:
            log_event("models reload failed", logging.ERROR, reason=result.error, models=self.models.names())
        return result

    def _served_labels(self) -> list[tuple[str, str, str]]:
        return [(name, e.engine.info.name, e.engine.info.version) for name, e in self.models.current().items()]

    # --------------------------------------------------------------- info

    def model_info(self) -> pb.GetModelInfoResponse:
        t0 = time.perf_counter()
        out = self._model_info()
        self.metrics.observe("GetModelInfo", "OK", time.perf_counter() - t0)
        return out

    def _model_info(self) -> pb.GetModelInfoResponse:
        served = self.models.current()
        kind = _device_kind(self.device)
        name = ""
        if kind == "cuda":
            import torch

            name = torch.cuda.get_device_name(self.device)
        lim = self.limits
        return pb.GetModelInfoResponse(
            model=_model_pb(served[DEFAULT_MODEL]),
            models=[pb.ServedModel(name=n, model=_model_pb(e)) for n, e in served.items()],
            device=kind,
            device_name=name,
            limits=pb.Limits(
                max_message_bytes=lim.max_message_bytes,
                max_tile_side=lim.max_tile_side,
                max_clicks_per_request=lim.max_clicks_per_request,
                max_concurrent_streams=lim.max_concurrent_streams,
                max_batch=lim.max_batch,
                batch_wait_ms=lim.batch_wait_ms,
                stream_window=lim.stream_window,
                auth_required=self.auth_required,
            ),
            server_version=__version__,
        )

    def stats(self) -> dict:
        with self._lock:
            out = dict(self._counts, active_calls=self._active_calls, active_streams=self._active_streams)
        out.update({f"batch_{k}": v for k, v in self.models.batch_stats().items()})
        return out

    # ------------------------------------------------------------ checks

    def _prepare(self, req: pb.SegmentRequest, engine) -> _Prepared:
        lim = self.limits
        if len(req.request_id) > MAX_REQUEST_ID:
            raise invalid(
                f"request_id is {len(req.request_id)} characters long; the limit is {MAX_REQUEST_ID}: "
                "use a shorter id (a counter or a UUID)"
            )
        n = len(req.clicks)
        if n > lim.max_clicks_per_request:
            raise too_big(
                f"{n} clicks in one request; the limit is {lim.max_clicks_per_request}: "
                "split the clicks over several requests"
            )
        tile = req.tile
        if not req.HasField("tile") or tile.width == 0 or tile.height == 0:
            raise invalid(f"tile is empty ({tile.width} x {tile.height} pixels); give its width and height")
        if max(tile.width, tile.height) > lim.max_tile_side:
            raise too_big(
                f"tile is {tile.width} x {tile.height} pixels; the limit is {lim.max_tile_side} per side: "
                "send smaller tiles"
            )
        d = tile.downsample or 1.0
        if not (math.isfinite(d) and MIN_DOWNSAMPLE <= d <= MAX_DOWNSAMPLE):
            raise invalid(f"tile downsample must be between {MIN_DOWNSAMPLE:g} and {MAX_DOWNSAMPLE:g}, not {d}")
        ox, oy = tile.origin_x, tile.origin_y
        if not (math.isfinite(ox) and math.isfinite(oy)):
            raise invalid(f"tile origin ({ox}, {oy}) is not finite")
        px = tile.pixel_size_um
        if not (math.isfinite(px) and 0 <= px <= MAX_PIXEL_SIZE_UM):
            raise invalid(f"tile pixel_size_um must be between 0 (unknown) and {MAX_PIXEL_SIZE_UM:g}, not {px}")
        tol = float(getattr(engine, "tolerance", 0.5))
        if req.HasField("simplify_tolerance"):
            tol = req.simplify_tolerance
            if not (math.isfinite(tol) and 0 <= tol <= MAX_TOLERANCE_PX):
                raise invalid(f"simplify_tolerance must be between 0 and {MAX_TOLERANCE_PX} px, not {tol}")
        w, h = int(tile.width), int(tile.height)
        x1, y1 = ox + w * d, oy + h * d
        seen: set[str] = set()
        for k, c in enumerate(req.clicks):
            label = repr(clip(c.id, 64)) if c.id else f"#{k}"
            if not (math.isfinite(c.x) and math.isfinite(c.y)):
                raise invalid(f"click {label} has a non-finite coordinate ({c.x}, {c.y})")
            if not c.id:
                raise invalid(f"click #{k} has no id; every click needs an id, unique within the request")
            if c.id in seen:
                raise invalid(f"click id {clip(c.id, 64)!r} appears twice; ids must be unique within a request")
            seen.add(c.id)
            if not c.context_only and not (ox <= c.x < x1 and oy <= c.y < y1):
                raise invalid(
                    f"click {label} at ({c.x:g}, {c.y:g}) is outside the tile "
                    f"[{ox:g}, {x1:g}) x [{oy:g}, {y1:g}) (level-0 coordinates)"
                )
        array = decode_tile(tile, lim.max_tile_side)

        # Bring the tile to the model's pixel size when both are known and differ.
        factor = 1.0
        model_px = float(engine.info.pixel_size_um or 0.0)
        if px > 0 and model_px > 0:
            tile_px = px * d
            if abs(tile_px - model_px) > PIXEL_SIZE_TOLERANCE * model_px:
                factor = tile_px / model_px
        sx = sy = 1.0
        if factor != 1.0:
            if not (1 / MAX_RESAMPLE <= factor <= MAX_RESAMPLE):
                raise invalid(
                    f"tile pixels of {px * d:g} um are too far from the model's {model_px:g} um to resample "
                    f"(factor {factor:g}); read the tile at a downsample nearer the model's pixel size"
                )
            nw, nh = max(1, round(w * factor)), max(1, round(h * factor))
            if nw > lim.max_tile_side or nh > lim.max_tile_side:
                raise too_big(
                    f"at the model's pixel size ({model_px:g} um) this tile would be {nw} x {nh} pixels; "
                    f"the limit is {lim.max_tile_side} per side: send smaller tiles"
                )
            array = _resample(array, nw, nh)
            sx, sy = nw / w, nh / h
        scale = (d / sx, d / sy)
        xy = np.array([[c.x, c.y] for c in req.clicks], dtype=np.float64).reshape(-1, 2)
        local = to_local(xy, (ox, oy), scale)
        # Rounding must not push an inside click onto the far edge.
        hi = np.nextafter(np.array([array.shape[1], array.shape[0]], dtype=np.float64), 0)
        for k, c in enumerate(req.clicks):
            if not c.context_only:
                local[k] = np.minimum(np.maximum(local[k], 0.0), hi)
        clicks = [
            Click(float(x), float(y), c.id, c.class_name or None) for (x, y), c in zip(local, req.clicks, strict=True)
        ]
        answer = [k for k, c in enumerate(req.clicks) if not c.context_only]
        return _Prepared(array, clicks, answer, (ox, oy), scale, factor, tol / math.sqrt(scale[0] * scale[1]))

    # ------------------------------------------------------------ segment

    def segment(
        self,
        req: pb.SegmentRequest,
        cancel: threading.Event | None = None,
        admit: bool = True,
        method: str = "Segment",
        deadline: float | None = None,
    ) -> pb.SegmentResponse:
        """Answer one request, or raise :class:`ServiceError`.

        A new call (``admit=True``) takes a compute slot, or waits for one in
        the admission queue while ``cancel`` is unset and ``deadline`` (a
        time.monotonic() value; None: none) has not passed; call it from a
        thread of its own.  Refused at once, counted in the metrics and logged
        (at most one line a second): RESOURCE_EXHAUSTED when the queue is full
        (the error's ``retry_after`` says when to ask again), UNAVAILABLE while
        the server drains.  ``admit=False`` for the requests of a stream that
        is already open: no slot, and a draining server finishes them.
        ``method`` labels the metrics."""
        t0 = time.perf_counter()
        ticket: _Ticket | None = None
        refusal: tuple[str, ServiceError] | None = None
        with self._lock:
            if admit and self._closed:
                refusal = ("shutting_down", ServiceError("UNAVAILABLE", "the server is shutting down"))
            elif admit and (ticket := self._admission.enter()) is None:
                wait_s = self._admission.retry_after()
                refusal = (
                    "queue_full",
                    ServiceError(
                        "RESOURCE_EXHAUSTED",
                        f"the server is busy: {self._admission.computing} calls are computing and its queue is full "
                        f"({self._admission.queue} waiting); retry after {wait_s:.1f} s",
                        retry_after=wait_s,
                    ),
                )
            if refusal is not None:
                self._counts["refused"] += 1
            else:
                self._active_calls += 1
                self._counts["requests"] += 1
        if refusal is not None:
            reason, exc = refusal
            self._refused(reason, exc, method, req.request_id)
            raise exc
        self.metrics.in_flight.inc()
        status = "OK"
        found = 0
        waited: float | None = None
        served: ServedModel | None = None
        try:
            if ticket is not None:
                w0 = time.perf_counter()
                self._admission.wait(ticket, cancel, deadline)
                waited = time.perf_counter() - w0
            try:
                served = self.models.acquire(req.model_name)
            except UnknownModel as exc:
                raise invalid(clip(str(exc), 1000)) from None
            prep = self._prepare(req, served.engine)
            view = _BatchedView.make(served.engine, served.batcher, cancel, prep.tolerance)
            try:
                seg = _segment(view, prep)
            except BridgeInputError as exc:
                raise invalid(str(exc)) from exc
            matrix = level0_affine(prep.origin, prep.scale)
            out = pb.SegmentResponse(
                request_id=req.request_id,
                resample_factor=prep.factor,
                model=served.label,
                model_name=served.name,
            )
            for k in prep.answer:
                r = seg.results[k]
                c = req.clicks[k]
                if r.found and r.polygon is not None:
                    r.polygon = affinity.affine_transform(r.polygon, matrix)
                    found += 1
                out.results.append(result_to_pb(r, c.id, c.class_name))
            return out
        except ServiceError as exc:
            status = exc.code
            if status == "CANCELLED":
                with self._lock:
                    self._counts["cancelled"] += 1
            raise
        except Cancelled as exc:
            status = "CANCELLED"
            with self._lock:
                self._counts["cancelled"] += 1
            raise ServiceError("CANCELLED", "the call was cancelled or its deadline expired") from exc
        except ShuttingDown as exc:
            status = "UNAVAILABLE"
            raise ServiceError("UNAVAILABLE", str(exc)) from exc
        except Exception:
            status = "INTERNAL"
            log.exception("segment failed")
            raise ServiceError("INTERNAL", "internal error while segmenting; see the server log") from None
        finally:
            if ticket is not None:
                self._admission.leave(ticket)
            if served is not None:
                self.models.release(served)
                self.metrics.model_requests.labels(name=served.name, code=status).inc()
            with self._lock:
                self._active_calls -= 1
                if status not in ("OK", "CANCELLED"):
                    self._counts["errors"] += 1
            self.metrics.in_flight.dec()
            answered = sum(1 for c in req.clicks if not c.context_only)
            self.metrics.observe(method, status, time.perf_counter() - t0, answered, found)
            log_event(
                "segment",
                request_id=clip(req.request_id, LOG_FIELD_CHARS),
                model_name=served.name if served is not None else clip(req.model_name, LOG_FIELD_CHARS) or None,
                model=served.label if served is not None else None,
                tile=f"{req.tile.width}x{req.tile.height}",
                clicks=len(req.clicks),
                found=found,
                status=status,
                ms=round(1000 * (time.perf_counter() - t0), 1),
                waited_ms=round(1000 * waited, 1) if waited is not None else None,
            )

    def _refused(self, reason: str, exc: ServiceError, method: str | None, request_id: str | None = None) -> None:
        """Count and log (at most one line a second per reason) a call refused before any work."""
        self.metrics.refuse(reason, method if method != "SegmentStream" else None, exc.code)
        self.metrics.throttle.log(
            log,
            f"refused:{reason}",
            "refused",
            logging.WARNING if reason == "queue_full" else logging.INFO,
            reason=reason,
            code=exc.code,
            method=method,
            request_id=clip(request_id, LOG_FIELD_CHARS) or None,
            computing=self._admission.computing,
            waiting=self._admission.waiting,
            streams=self._active_streams,
        )

    def rejected_message(self, method: str, exc: ServiceError, peer: str | None = None) -> None:
        """Count and log (at most one line a second) a message that could not be
        parsed, so never reached :meth:`segment`: the transports call this
        (gRPC for bytes that are not the method's protobuf message)."""
        self.metrics.requests.labels(method=method, code=exc.code).inc()
        self.metrics.throttle.log(
            log, "unparsable", "unparsable message", logging.INFO, method=method, peer=peer, reason=exc.message
        )

    def segment_one(self, req: pb.SegmentRequest, cancel: threading.Event | None) -> pb.SegmentResponse:
        """For streams: a failed request becomes a response with ``error`` set."""
        try:
            return self.segment(req, cancel, admit=False, method="SegmentStream")
        except ServiceError as exc:
            if exc.code in ("CANCELLED", "UNAVAILABLE"):
                raise
            # Never echo an id refused as too long.
            rid = req.request_id if len(req.request_id) <= MAX_REQUEST_ID else ""
            return pb.SegmentResponse(request_id=rid, error=pb.Error(code=exc.code, message=exc.message))

    # ------------------------------------------------------------- streams

    def open_stream(self) -> None:
        """Take a stream slot or raise RESOURCE_EXHAUSTED (no slot free, with
        ``retry_after``) or UNAVAILABLE (draining); refusals are counted and logged."""
        with self._lock:
            if self._closed:
                reason, exc = "shutting_down", ServiceError("UNAVAILABLE", "the server is shutting down")
            elif self._active_streams >= self.limits.max_concurrent_streams:
                self._counts["streams_refused"] += 1
                reason = "streams_full"
                exc = ServiceError(
                    "RESOURCE_EXHAUSTED",
                    f"{self._active_streams} streams are open; the limit is "
                    f"{self.limits.max_concurrent_streams}: retry later or use fewer streams",
                    http_status=429,
                    retry_after=1.0,
                )
            else:
                self._active_streams += 1
                return
        self._refused(reason, exc, "SegmentStream")
        raise exc

    def close_stream(self) -> None:
        with self._lock:
            self._active_streams -= 1

    def segment_stream(
        self,
        requests: Iterable[pb.SegmentRequest | ServiceError],
        cancel: threading.Event,
        peer: str | None = None,
    ) -> Iterator[pb.SegmentResponse]:
        """Responses in request order, with up to ``stream_window`` requests
        segmented at once while the next ones are being received.  The caller
        has taken a slot with :meth:`open_stream`.  Items of ``requests`` that
        are already a ServiceError (e.g. unparsable JSON lines) are answered
        with that error.

        A stream whose client sends nothing for ``limits.stream_idle_timeout_s``
        while it has no answer outstanding is ended with ServiceError
        DEADLINE_EXCEEDED (logged with ``peer``, counted in
        ``nuclick_stream_idle_timeouts_total``), so that idle clients cannot
        hold the stream slots; the transport then ends the call, which stops
        the reading of ``requests``."""
        pending: queue.Queue = queue.Queue(maxsize=self.limits.stream_window)
        end = object()
        idle_s = self.limits.stream_idle_timeout_s
        activity = threading.Lock()
        # When the client last sent or was sent something, and the requests not yet answered.
        state = {"last": time.monotonic(), "outstanding": 0}

        def touch(delta: int) -> None:
            with activity:
                state["last"] = time.monotonic()
                state["outstanding"] += delta

        def idle_for() -> float:
            with activity:
                return 0.0 if state["outstanding"] else time.monotonic() - state["last"]

        def put(item) -> bool:
            while not cancel.is_set():
                try:
                    pending.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def reader() -> None:
            try:
                for item in requests:
                    if cancel.is_set():
                        return
                    touch(+1)
                    if isinstance(item, ServiceError):
                        fut: Future = Future()
                        fut.set_result(pb.SegmentResponse(error=pb.Error(code=item.code, message=item.message)))
                    else:
                        fut = self._pool.submit(self.segment_one, item, cancel)
                    if not put(fut):
                        fut.cancel()
                        return
            except Exception as exc:  # the transport ended the request stream (cancel, reset)
                put(exc)
            finally:
                put(end)

        thread = threading.Thread(target=reader, name="nuclick-stream-reader", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    item = pending.get(timeout=0.05)
                except queue.Empty:
                    if cancel.is_set():
                        return
                    if idle_s and (quiet := idle_for()) >= idle_s:
                        self.metrics.stream_idle.inc()
                        log_event("stream idle timeout", logging.INFO, peer=peer, idle_s=round(quiet, 1))
                        raise ServiceError(
                            "DEADLINE_EXCEEDED",
                            f"the stream sent no request for {idle_s:g} s (the server's stream idle timeout) and was "
                            "ended to free its slot; open a new stream when there is more to send",
                        ) from None
                    continue
                if item is end:
                    return
                if isinstance(item, Exception):
                    if cancel.is_set():
                        return
                    raise item
                answer = item.result()
                yield answer
                touch(-1)
        except ServiceError:
            raise
        except Exception:  # a bug, not the client's doing: one clean INTERNAL for every transport
            log.exception("stream failed")
            raise ServiceError("INTERNAL", INTERNAL_STREAM) from None
        finally:
            cancel.set()  # stops the reader and drops queued work
            while True:
                try:
                    item = pending.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, Future):
                    item.cancel()

    # ------------------------------------------------------------ shutdown

    def drain(self, timeout: float) -> bool:
        """Refuse new calls (UNAVAILABLE, counted and logged); wait until the
        calls in flight, the queued ones included, are done.  When ``timeout``
        runs out first, the calls still waiting for a slot are refused
        UNAVAILABLE (none has started: a retry is safe) and False is returned."""
        with self._lock:
            self._closed = True
        deadline = time.monotonic() + timeout
        while True:  # looks at least once, so that drain(0) of an idle server says True
            with self._lock:
                if self._active_calls == 0 and self._active_streams == 0:
                    return True
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        self._refuse_waiting()
        return False

    def _refuse_waiting(self) -> None:
        n = self._admission.refuse_waiting()
        if n:
            self.metrics.refused.labels(reason="shutting_down").inc(n)
            log_event("refused waiting calls", logging.WARNING, reason="shutting_down", calls=n)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._refuse_waiting()
        self.models.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _device_kind(device) -> str:
    return getattr(device, "type", str(device))


def _model_pb(served: ServedModel) -> pb.Model:
    engine = served.engine
    info = engine.info
    return pb.Model(
        name=info.name,
        version=info.version,
        sha256=info.sha256,
        width=info.width,
        patch_size=info.patch_size,
        sigma=info.sigma,
        threshold=float(getattr(engine, "threshold", info.threshold)),
        pixel_size_um=info.pixel_size_um,
        arch=info.arch,
    )


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _segment(view, prep: _Prepared):
    """Segment the answered clicks and the context clicks whose patches can
    overlap theirs (their raw masks take part in overlap resolution); the
    other context clicks only guide (exclusion maps), as in a whole-image run."""
    clicks, size = prep.clicks, int(view.patch_size)
    reader = ArrayReader(prep.array)
    reasons = outside_reasons(clicks, reader.width, reader.height)
    todo = [k for k in range(len(clicks)) if k not in reasons]
    if len(prep.answer) < len(clicks) and prep.answer:
        xy = np.array([[c.x, c.y] for c in clicks], dtype=np.float64)
        # Chebyshev distance to the nearest answered click, in array pixels.
        near, _ = cKDTree(xy[prep.answer]).query(xy, p=np.inf)
        todo = [k for k in todo if near[k] < size + 1]
    elif not prep.answer:
        todo = []
    masks = dict(view.iter_patches(reader, clicks, todo))
    return view.finish(clicks, masks, reasons)


def _resample(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 resampling of a tile: area-averaged when
    shrinking, bilinear when enlarging (Pillow's resize samples pixel
    centres, matching the continuous convention of bridge.io.coords)."""
    from PIL import Image

    return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None))
