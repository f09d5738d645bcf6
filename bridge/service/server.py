"""The gRPC server (``nuclick.v1.NuClick`` plus health and reflection) and,
beside it, the HTTP/JSON gateway; both over one :class:`SegmentService`.

Tests and embedders build it in-process with any engine::

    server = NuClickServer(engine, port=0, http_port=0).start()
    ... server.grpc_port, server.http_port ...
    server.stop(grace=5)
"""

from __future__ import annotations

import logging
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
from bridge.service.http import HttpGateway
from bridge.service.models import DEFAULT_MODEL, ReloadResult

log = logging.getLogger("bridge.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NuClick"].full_name


def _abort(context: grpc.ServicerContext, exc: ServiceError):
    context.abort(grpc.StatusCode[exc.code], exc.message)


class NuClickServicer(pb_grpc.NuClickServicer):
    def __init__(self, service: SegmentService) -> None:
        self.service = service

    def Segment(self, request, context):
        cancel = threading.Event()
        context.add_callback(cancel.set)
        try:
            return self.service.segment(request, cancel)
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
        log_event("stream opened", peer=context.peer())
        try:
            yield from self.service.segment_stream(request_iterator, cancel)
        except ServiceError as exc:
            _abort(context, exc)
        finally:
            release()

    def GetModelInfo(self, request, context):
        return self.service.model_info()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class NuClickServer:
    """gRPC on ``host:port`` and HTTP/JSON on ``host:http_port`` (None: off).

    Port 0 picks a free port (see :attr:`grpc_port`, :attr:`http_port`).
    ``tls`` is (certificate chain PEM, private key PEM) for both; ``token``
    enables bearer-token auth on both.  ``engine`` is one engine (served as
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
        self.host = host
        self._port = port
        self._http_port = http_port
        self.limits = limits
        self.tokens = TokenCheck(token)
        self.tls = tls
        self.workers = workers
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
        )
        size = self.limits.max_message_bytes
        options = [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),  # a second server on the same port is an error, not a silent share
        ]
        interceptors = [AuthInterceptor(self.tokens)] if self.tokens.required else []
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="nuclick-grpc"),
            interceptors=interceptors,
            options=options,
            # Calls beyond this wait in no queue: they get RESOURCE_EXHAUSTED at once.
            maximum_concurrent_rpcs=4 * self.workers,
        )
        pb_grpc.add_NuClickServicer_to_server(NuClickServicer(self.service), server)
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
                    max_threads=self.workers,
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
