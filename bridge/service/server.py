"""The gRPC server (``nuclick.v1.NuClick`` plus health and reflection) and,
beside it, the HTTP/JSON gateway; both over one :class:`SegmentService`.

Tests and embedders build it in-process with any engine::

    server = NuClickServer(engine, port=0, http_port=0).start()
    ... server.grpc_port, server.http_port ...
    server.stop(grace=5)

Errors a client meets on gRPC besides its request's own:

- RESOURCE_EXHAUSTED when the server is busy: its compute slots (``workers``)
  are taken and its queue (``Limits.max_queued_calls``) is full, or no stream
  slot is free.  The trailing metadata ``retry-after-ms`` (whole milliseconds)
  says how long to wait before asking again.  A call that finds the queue with
  room waits there instead (within its deadline).
- UNAVAILABLE while the server drains: retry on another replica or later.
- DEADLINE_EXCEEDED ending a ``SegmentStream`` that sent nothing for
  ``Limits.stream_idle_timeout_s`` seconds.
- INVALID_ARGUMENT for bytes that are not the method's protobuf message.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bridge.errors import BridgeInputError
from bridge.service.auth import AuthInterceptor, TokenCheck
from bridge.service.convert import ServiceError
from bridge.service.core import Limits, SegmentService, log_event
from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.gen import nuclick_pb2_grpc as pb_grpc
from bridge.service.http import HttpBounds, HttpGateway
from bridge.service.models import DEFAULT_MODEL, ReloadResult

log = logging.getLogger("bridge.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NuClick"].full_name


# Trailing metadata of a busy refusal: how long to wait before asking again, in whole milliseconds.
RETRY_AFTER_KEY = "retry-after-ms"
# Handler threads beyond compute slots, queue and streams: health checks, model
# info, reflection, and refusing calls at once when the queue is full.
SPARE_THREADS = 32


def _abort(context: grpc.ServicerContext, exc: ServiceError):
    if exc.retry_after is not None:
        ms = max(1, math.ceil(1000 * exc.retry_after))
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(ms)),))
    context.abort(grpc.StatusCode[exc.code], exc.message)


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value; None when it has none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:  # no deadline reads as one in the far future
        return None
    return time.monotonic() + remaining


def _parser(message: Any) -> Callable[[bytes], Any]:
    """``message.FromString`` that returns a ServiceError (INVALID_ARGUMENT) for
    bytes that are not such a message.  gRPC Python answers a deserializer's
    exception with INTERNAL and logs a traceback per call; the handlers turn
    this value into a clean INVALID_ARGUMENT instead (a stream answers it in
    place, as the HTTP gateway answers an unparsable line)."""
    name = message.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except Exception as exc:  # DecodeError, and anything else the parser raises on bad bytes
            return ServiceError(
                "INVALID_ARGUMENT",
                f"the request is not a {name} protobuf message ({exc or type(exc).__name__}); "
                "check that the client uses nuclick.v1's generated code",
            )

    return parse


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(servicer: NuClickServicer, server: grpc.Server) -> None:
    """What the generated ``add_NuClickServicer_to_server`` does, every method
    of the service's descriptor, with request parsing through :func:`_parser`."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["NuClick"].methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_parser(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class NuClickServicer(pb_grpc.NuClickServicer):
    def __init__(self, service: SegmentService) -> None:
        self.service = service

    def _unparsable(self, method: str, exc: ServiceError, context: grpc.ServicerContext) -> None:
        self.service.rejected_message(method, exc, context.peer())
        _abort(context, exc)

    def Segment(self, request, context):
        if isinstance(request, ServiceError):
            self._unparsable("Segment", request, context)
        cancel = threading.Event()
        context.add_callback(cancel.set)
        try:
            return self.service.segment(request, cancel, deadline=_deadline(context))
        except ServiceError as exc:
            _abort(context, exc)

    def SegmentStream(self, request_iterator, context):
        try:
            self.service.open_stream()
        except ServiceError as exc:
            _abort(context, exc)
        cancel = threading.Event()
        released = threading.Lock()
        state = {"open": True}

        def release() -> None:
            cancel.set()
            with released:
                if state["open"]:
                    state["open"] = False
                    self.service.close_stream()

        context.add_callback(release)
        peer = context.peer()
        log_event("stream opened", peer=peer)
        try:
            yield from self.service.segment_stream(request_iterator, cancel, peer=peer)
        except ServiceError as exc:
            _abort(context, exc)
        finally:
            release()

    def GetModelInfo(self, request, context):
        if isinstance(request, ServiceError):
            self._unparsable("GetModelInfo", request, context)
        return self.service.model_info()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class NuClickServer:
    """gRPC on ``host:port`` and HTTP/JSON on ``host:http_port`` (None: off).

    Port 0 picks a free port (see :attr:`grpc_port`, :attr:`http_port`).
    ``tls`` is (certificate chain PEM, private key PEM) for both; ``token``
    enables bearer-token auth on both.  ``workers`` unary calls compute at
    once and ``limits.max_queued_calls`` more wait for a slot (see
    :class:`~bridge.service.core.Admission`); both transports get enough
    handler threads (:attr:`handler_threads`) that a waiting call waits in that
    queue, counted, and a call beyond it is refused at once with a retry hint.
    ``engine`` is one engine (served as
    "default") or a mapping of model name -> engine holding "default";
    ``models_dir`` and ``load`` add a folder of weights files, read again by
    :meth:`reload_models` (see :class:`~bridge.service.core.SegmentService`).
    """

    def __init__(
        self,
        engine,
        host: str = "127.0.0.1",
        port: int = 50051,
        http_port: int | None = 8080,
        limits: Limits | None = None,
        token: str | None = None,
        tls: tuple[bytes, bytes] | None = None,
        workers: int = 32,
        threads: int = 0,
        models_dir: str | Path | None = None,
        load: Callable[[Path], Any] | None = None,
        http_bounds: HttpBounds | None = None,
    ) -> None:
        limits = limits or Limits()
        if workers <= limits.max_concurrent_streams:
            raise BridgeInputError(
                f"--workers ({workers}) must exceed --max-streams ({limits.max_concurrent_streams}): "
                "each open stream holds a worker"
            )
        self.engines = dict(engine) if isinstance(engine, Mapping) else {DEFAULT_MODEL: engine}
        if DEFAULT_MODEL not in self.engines:
            raise BridgeInputError(f"the server needs a model named {DEFAULT_MODEL!r}")
        self.engine = self.engines[DEFAULT_MODEL]
        self.models_dir = models_dir
        self._load = load
        self.http_bounds = http_bounds or HttpBounds()
        self.host = host
        self._port = port
        self._http_port = http_port
        self.limits = limits
        self.tokens = TokenCheck(token)
        self.tls = tls
        self.workers = workers
        # Every computing, waiting and streaming call holds one handler thread (threads are
        # cheap, and created only when needed); the spare ones refuse calls beyond the queue.
        self.handler_threads = workers + limits.max_queued_calls + limits.max_concurrent_streams + SPARE_THREADS
        self.threads = threads
        self.service: SegmentService | None = None
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._server: grpc.Server | None = None
        self._http: HttpGateway | None = None
        self._health: health.HealthServicer | None = None
        self._stopped = threading.Event()

    def start(self) -> NuClickServer:
        self.service = SegmentService(
            self.engines,
            self.limits,
            auth_required=self.tokens.required,
            threads=self.threads,
            models_dir=self.models_dir,
            load=self._load,
            workers=self.workers,
        )
        size = self.limits.max_message_bytes
        options = [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),  # a second server on the same port is an error, not a silent share
        ]
        interceptors = [AuthInterceptor(self.tokens, self.service.metrics)] if self.tokens.required else []
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.handler_threads, thread_name_prefix="nuclick-grpc"),
            interceptors=interceptors,
            options=options,
            # A last resort only: our own queue refuses long before (counted, with a retry hint).
            # gRPC refuses calls beyond this with RESOURCE_EXHAUSTED, uncounted.
            maximum_concurrent_rpcs=2 * self.handler_threads,
        )
        add_servicer(NuClickServicer(self.service), server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
        )
        address = _address(self.host, self._port)
        try:
            if self.tls:
                creds = grpc.ssl_server_credentials([(self.tls[1], self.tls[0])])
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            port = 0
            reason = str(exc)
        else:
            reason = "address in use?"
        if not port:
            self.service.close()
            raise BridgeInputError(f"cannot listen for gRPC on {address} ({reason})")
        self.grpc_port = port
        if self._http_port is not None:
            try:
                self._http = HttpGateway(
                    self.service,
                    self.host,
                    self._http_port,
                    self.tokens,
                    tls=self.tls,
                    max_body=size,
                    max_threads=self.handler_threads,
                    bounds=self.http_bounds,
                ).start()
            except BaseException:
                self.service.close()
                raise
            self.http_port = self._http.port
        server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        info = self.engine.info
        log_event(
            "listening",
            grpc=_address(self.host, self.grpc_port),
            http=_address(self.host, self.http_port) if self.http_port else None,
            tls=bool(self.tls),
            auth=self.tokens.required,
            model=info.name,
            version=info.version,
            models=self.service.models.names(),
            device=str(getattr(self.engine, "device", "cpu")),
            max_batch=self.limits.max_batch,
            workers=self.workers,
            queue=self.limits.max_queued_calls,
        )
        return self

    def stats(self) -> dict:
        assert self.service is not None
        return self.service.stats()

    def reload_models(self) -> ReloadResult:
        """Read ``models_dir`` again (what SIGHUP does): see :meth:`SegmentService.reload_models`."""
        assert self.service is not None
        return self.service.reload_models()

    def stop(self, grace: float = 10.0) -> None:
        """Graceful: health turns NOT_SERVING, new calls are refused, calls in
        flight get up to ``grace`` seconds to finish, then the rest is cancelled."""
        if self._stopped.is_set() or self._server is None:
            return
        log_event("stopping", grace_s=grace)
        assert self.service is not None and self._health is not None
        # grpc_health sends a Watch stream's first answer while holding the lock
        # that enter_graceful_shutdown needs; a client that went away mid-send can
        # keep it (seen once, under load, with gRPC's client-side health checks).
        # Bound the wait: stopping gRPC below cancels that stream and frees the lock.
        marking = threading.Thread(target=self._health.enter_graceful_shutdown, name="health-shutdown", daemon=True)
        marking.start()
        marking.join(min(grace, 2.0))
        if marking.is_alive():
            log_event("health_shutdown_blocked", logging.WARNING, waited_s=min(grace, 2.0))
        if self._http is not None:
            self._http.refuse_new()
        # Refuse new calls in our own handlers first (a clean UNAVAILABLE, which
        # clients retry), let the calls in flight finish, and only then stop
        # gRPC itself: a call that reaches a stopping gRPC server may instead
        # come back CANCELLED, which a client must not retry.
        t0 = time.monotonic()
        self.service.drain(grace)
        if self._http is not None:
            self._http.wait_idle(max(0.0, grace - (time.monotonic() - t0)))
            self._http.close()
        remaining = max(0.0, grace - (time.monotonic() - t0))
        self._server.stop(remaining).wait(remaining + 1)
        self.service.close()
        self._stopped.set()
        log_event("stopped", **{k: v for k, v in self.stats().items() if not k.startswith("active")})

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> NuClickServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc) -> None:
        self.stop(grace=1.0)
