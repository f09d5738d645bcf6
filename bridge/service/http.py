"""HTTP/JSON gateway: the gRPC methods for clients that cannot link gRPC
(QuPath scripts, the QuPath extension, curl), served by uvicorn.

Bodies use the proto3 JSON mapping (``google.protobuf.json_format``): field
names in lowerCamelCase (snake_case is accepted too), ``bytes`` as base64,
enums by name.  Routes (described for machines in ``GET /openapi.json``):

    GET  /v1/model          -> GetModelInfoResponse
    POST /v1/segment        SegmentRequest -> SegmentResponse
    POST /v1/segmentStream  NDJSON, one SegmentRequest per line -> NDJSON of
                            SegmentResponse, chunked, in order; the size limit
                            applies to each line, as gRPC's to each message
    GET  /healthz           {"status": "SERVING"} (503 while shutting down)
    GET  /metrics           Prometheus' text format (bridge.service.metrics); it needs
                            the token like /v1/*, and still answers while draining
    GET  /openapi.json      the OpenAPI 3.1 description of these routes (no token)

Errors carry the gRPC status name and the same message as over gRPC:
``{"code": "INVALID_ARGUMENT", "message": "..."}`` with the HTTP status of
:data:`bridge.service.convert.HTTP_STATUS` (413 for a body or tile over the
size limits); every error is in that form, a malformed request line included.
``Authorization: Bearer <token>`` is checked as on gRPC.

Order of work for a request: the route and the token are checked from the
head alone; then the whole body is read under one deadline
(``body_timeout``); only then does the request wait for the network.  A
client that stalls or trickles therefore holds a socket and a coroutine,
never a compute thread, and nobody else waits for it.  The connection-level
bounds (open connections, time to send a request head, TLS) are in
:mod:`bridge.service.http_protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import uvicorn
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bridge.errors import BridgeInputError
from bridge.service.auth import TokenCheck, record_auth_failure
from bridge.service.convert import HTTP_STATUS, ServiceError
from bridge.service.core import INTERNAL_STREAM, SegmentService, log_event
from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.http_protocol import BoundedH11Protocol, ConnectionLimits, error_bytes, peer_name
from bridge.service.metrics import CONTENT_TYPE_LATEST
from bridge.service.openapi import openapi_document

log = logging.getLogger("bridge.service.http")

JSON = "application/json"
NDJSON = "application/x-ndjson"
SHUTTING_DOWN = "the server is shutting down"


def to_json(msg) -> bytes:
    return json_format.MessageToJson(msg, indent=None, always_print_fields_with_no_presence=True).encode("utf-8")


def parse_request(body: bytes | str) -> pb.SegmentRequest:
    try:
        return json_format.Parse(body, pb.SegmentRequest())
    except (json_format.ParseError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ServiceError("INVALID_ARGUMENT", f"request body is not a SegmentRequest in JSON: {exc}") from None


class _Close(Exception):
    """Marks a ServiceError after which the connection must be closed (its body stays unread)."""


def _error_response(exc: ServiceError, close: bool = False) -> Response:
    status = exc.http_status or HTTP_STATUS.get(exc.code, 500)
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if close:
        headers["Connection"] = "close"
    return Response(error_bytes(exc.code, exc.message), status, headers=headers, media_type=JSON)


# h11 bounds a request head only while it is incomplete; a whole one that came in one read is measured here.
MAX_HEAD = 64 * 1024
MAX_TARGET = 8 * 1024


def _head_refusal(scope) -> ServiceError | None:
    """A request head that no client of ours sends: an HTTP version other than
    1.0/1.1, a target over 8 kB, or a head over 64 kB in all."""
    if scope.get("http_version") not in ("1.0", "1.1"):
        return ServiceError("UNIMPLEMENTED", f"HTTP/{scope.get('http_version')} is not served", http_status=505)
    target = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
    if target > MAX_TARGET:
        return ServiceError("INVALID_ARGUMENT", f"the request target is over {MAX_TARGET} bytes", http_status=414)
    head = target + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
    if head > MAX_HEAD:
        return ServiceError("INVALID_ARGUMENT", f"the request head is over {MAX_HEAD} bytes", http_status=431)
    return None


def _parse_line(line: bytes) -> pb.SegmentRequest | ServiceError:
    try:
        return parse_request(line)
    except ServiceError as exc:
        return exc


class _App:
    """The routes, over a :class:`~bridge.service.core.SegmentService`."""

    def __init__(self, gateway: HttpGateway) -> None:
        self.gw = gateway
        self.service = gateway.service
        routes = [
            Route("/v1/model", self.model, methods=["GET"]),
            Route("/v1/segment", self.segment, methods=["POST"]),
            Route("/v1/segmentStream", self.stream, methods=["POST"]),
            Route("/healthz", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ]
        self.known = {r.path for r in routes}
        self.starlette = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception, Exception: self._crash},
        )

    async def __call__(self, scope, receive, send) -> None:
        refusal = _head_refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await _error_response(refusal, close=True)(scope, receive, send)
            return
        await self.starlette(scope, receive, send)

    # ----------------------------------------------------- around routes

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's 404 and 405, in our error form."""
        path = request.url.path
        if exc.status_code == 405 or (exc.status_code == 404 and path in self.known):
            err = ServiceError("UNIMPLEMENTED", f"{request.method} is not allowed on {path}", http_status=405)
        elif exc.status_code == 404:
            err = ServiceError("NOT_FOUND", f"no such route: {request.method} {path}")
        else:
            err = ServiceError("INVALID_ARGUMENT", str(exc.detail), http_status=exc.status_code)
        return _error_response(err)

    async def _crash(self, request: Request, exc: Exception) -> Response:
        log.error(
            "HTTP %s %s failed",
            request.method,
            request.url.path,
            exc_info=exc,
            extra={"fields": {"peer": _peer(request)}},
        )
        return _error_response(ServiceError("INTERNAL", "internal error; see the server log"), close=True)

    def _open_call(self, request: Request, metrics: bool = False) -> None:
        """Refused while draining (``/metrics`` still answers), then the token, from the head alone."""
        if self.gw.refusing and not metrics:
            raise ServiceError("UNAVAILABLE", SHUTTING_DOWN)
        reason = self.gw.tokens.check(request.headers.get("authorization"))
        if reason is not None:
            self.gw.auth_failed(_peer(request), reason, request.url.path)
            raise ServiceError("UNAUTHENTICATED", reason)

    async def _guard(self, request: Request, handler) -> Response:
        """Runs ``handler`` with the gateway's count of requests in flight and turns errors into replies."""
        self.gw.enter()
        try:
            return await handler()
        except _Close as wrapped:
            return _error_response(wrapped.args[0], close=True)
        except ServiceError as exc:
            # Draining: tell the client to go elsewhere and not to reuse this connection.
            return _error_response(exc, close=exc.code == "UNAVAILABLE")
        except ClientDisconnect:
            return Response(status_code=499)  # nobody reads it
        finally:
            self.gw.leave()

    # ------------------------------------------------------------- bodies

    def _declared_length(self, request: Request) -> int:
        length = request.headers.get("content-length")
        if request.headers.get("transfer-encoding", "").lower() == "chunked" or length is None:
            raise _Close(
                ServiceError("INVALID_ARGUMENT", "send the body with a Content-Length header", http_status=411)
            )
        try:
            n = int(length)
        except ValueError:
            raise _Close(ServiceError("INVALID_ARGUMENT", f"bad Content-Length {length!r}")) from None
        if n < 0:
            raise _Close(ServiceError("INVALID_ARGUMENT", f"bad Content-Length {length!r}"))
        return n

    async def _read(self, request: Request, n: int, sink) -> None:
        """Feed the ``n``-byte body to ``sink(chunk)`` within the body deadline."""
        got = 0
        try:
            async with asyncio.timeout(self.gw.body_timeout):
                async for chunk in request.stream():
                    got += len(chunk)
                    if got > n:
                        raise _Close(ServiceError("INVALID_ARGUMENT", f"request body is longer than its {n} bytes"))
                    if chunk:
                        sink(chunk)
        except TimeoutError:
            log_event(
                "http body too slow",
                logging.WARNING,
                peer=_peer(request),
                path=request.url.path,
                got=got,
                of=n,
                limit_s=self.gw.body_timeout,
            )
            raise _Close(
                ServiceError(
                    "DEADLINE_EXCEEDED",
                    f"the request body did not arrive within {self.gw.body_timeout:g} s ({got} of {n} bytes)",
                    http_status=408,
                )
            ) from None
        if got != n:
            raise _Close(ServiceError("INVALID_ARGUMENT", f"request body ended after {got} of {n} bytes"))

    async def _body(self, request: Request) -> bytes:
        n = self._declared_length(request)
        if n > self.gw.max_body:
            raise _Close(
                ServiceError(
                    "RESOURCE_EXHAUSTED",
                    f"request body of {n} bytes is over the limit of {self.gw.max_body} bytes: send smaller tiles",
                    http_status=413,
                )
            )
        parts: list[bytes] = []
        await self._read(request, n, parts.append)
        return b"".join(parts)

    async def _stream_body(self, request: Request) -> tempfile.SpooledTemporaryFile:
        """The NDJSON body, read in full before answering (a client may send it
        all before it reads), into memory up to the size limit and into a
        temporary file beyond.  The limit applies to each line (one message, as
        on gRPC), not to the whole stream."""
        n = self._declared_length(request)
        limit = self.gw.max_body
        spool = tempfile.SpooledTemporaryFile(max_size=limit)  # noqa: SIM115 (the caller closes it)
        line = bytearray()

        def sink(chunk: bytes) -> None:
            start = 0
            while start < len(chunk):
                end = chunk.find(b"\n", start)
                piece = chunk[start:] if end < 0 else chunk[start : end + 1]
                line.extend(piece)
                if len(line.rstrip(b"\r\n")) > limit:
                    raise _Close(
                        ServiceError(
                            "RESOURCE_EXHAUSTED",
                            f"a line of the stream is over the limit of {limit} bytes per message: send smaller tiles",
                            http_status=413,
                        )
                    )
                if end < 0:
                    return
                spool.write(bytes(line))
                line.clear()
                start = end + 1

        try:
            await self._read(request, n, sink)
            if line:
                spool.write(bytes(line) + b"\n")
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool

    # ---------------------------------------------------------- computing

    async def _compute(self, request: Request, call, cancel: threading.Event):
        """``call()`` on a compute thread; the client hanging up, or the server
        giving up on it at shutdown, sets ``cancel``."""
        loop = asyncio.get_running_loop()
        self.gw.track(cancel)
        watcher = asyncio.ensure_future(_watch_disconnect(request, cancel))
        try:
            return await loop.run_in_executor(self.gw.pool, call)
        except asyncio.CancelledError:
            cancel.set()
            raise
        finally:
            watcher.cancel()
            self.gw.untrack(cancel)

    # ------------------------------------------------------------- routes

    async def health(self, request: Request) -> Response:
        refusing = self.gw.refusing
        body = json.dumps({"status": "NOT_SERVING" if refusing else "SERVING"}).encode()
        return Response(body, 503 if refusing else 200, media_type=JSON)

    async def openapi(self, request: Request) -> Response:
        return Response(self.gw.openapi, media_type=JSON)

    async def metrics(self, request: Request) -> Response:
        async def handler() -> Response:
            self._open_call(request, metrics=True)
            return Response(self.service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

        return await self._guard(request, handler)

    async def model(self, request: Request) -> Response:
        async def handler() -> Response:
            self._open_call(request)
            return Response(to_json(self.service.model_info()), media_type=JSON)

        return await self._guard(request, handler)

    async def segment(self, request: Request) -> Response:
        async def handler() -> Response:
            self._open_call(request)
            try:
                req = parse_request(await self._body(request))
            except ServiceError as exc:
                if exc.code == "INVALID_ARGUMENT":
                    self.service.rejected_message("Segment", exc, _peer(request))
                raise
            cancel = threading.Event()
            try:
                resp = await self._compute(request, partial(self.service.segment, req, cancel), cancel)
            except ServiceError as exc:
                if exc.code == "CANCELLED" and self.gw.giving_up:
                    raise ServiceError("UNAVAILABLE", SHUTTING_DOWN) from None
                raise
            return Response(to_json(resp), media_type=JSON)

        return await self._guard(request, handler)

    async def stream(self, request: Request) -> Response:
        async def handler() -> Response:
            self._open_call(request)
            body = await self._stream_body(request)
            try:
                self.service.open_stream()
            except BaseException:
                body.close()
                raise
            cancel = threading.Event()
            self.gw.track(cancel)
            chunks = self._stream_chunks(body, cancel)
            return StreamingResponse(_closing(chunks, cancel, self.gw), media_type=NDJSON)

        return await self._guard(request, handler)

    def _stream_chunks(self, body, cancel: threading.Event) -> Iterator[bytes]:
        """NDJSON lines of responses; an error after the status line has gone
        ends the body with an error record (never a second response inside it)."""
        try:
            requests = (_parse_line(line) for line in body if line.strip())
            try:
                for resp in self.service.segment_stream(requests, cancel):
                    yield to_json(resp) + b"\n"
            except ServiceError as exc:
                if exc.code == "CANCELLED" and self.gw.giving_up:
                    exc = ServiceError("UNAVAILABLE", SHUTTING_DOWN)
                yield json.dumps({"error": {"code": exc.code, "message": exc.message}}).encode() + b"\n"
            except Exception:
                log.exception("HTTP stream failed")
                internal = {"code": "INTERNAL", "message": INTERNAL_STREAM}
                yield json.dumps({"error": internal}).encode() + b"\n"
        finally:
            cancel.set()
            self.service.close_stream()
            body.close()


async def _closing(chunks: Iterator[bytes], cancel: threading.Event, gw: HttpGateway):
    """The stream's chunks, each computed on a compute thread; the count of
    requests in flight covers the whole body, and the client hanging up stops it."""
    loop = asyncio.get_running_loop()
    gw.enter()
    end = object()
    try:
        while True:
            chunk = await loop.run_in_executor(gw.pool, next, chunks, end)
            if chunk is end:
                return
            yield chunk
    finally:
        cancel.set()
        await loop.run_in_executor(gw.pool, chunks.close)
        gw.untrack(cancel)
        gw.leave()


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client goes away while its request is computed."""
    with contextlib.suppress(Exception):
        while not cancel.is_set():
            message = await request.receive()
            if message["type"] == "http.disconnect":
                cancel.set()
                return


def _peer(request: Request) -> str:
    client = request.client
    return peer_name((client.host, client.port) if client else None)


@dataclass(frozen=True)
class HttpBounds:
    """What one HTTP client can hold (``serve --http-*``): open connections in
    all, seconds to send a whole request head, seconds to send a whole body,
    and seconds an idle kept-alive connection stays open."""

    max_connections: int = 1000
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive: float = 15.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise BridgeInputError(f"--http-max-connections must be at least 1, not {self.max_connections}")
        for name in ("header_timeout", "body_timeout", "keep_alive"):
            if not getattr(self, name) > 0:
                raise BridgeInputError(f"--http-{name.replace('_', '-')} must be above 0, not {getattr(self, name)}")


class HttpGateway:
    """uvicorn on its own thread and event loop, over ``service``.

    ``max_threads`` threads run the calls (they wait in the service's queue
    and for the network, never for clients); ``bounds`` limit what clients
    can hold.
    """

    def __init__(
        self,
        service: SegmentService,
        host: str,
        port: int,
        tokens: TokenCheck,
        tls: tuple[bytes, bytes] | None = None,
        max_body: int = 64 << 20,
        max_threads: int = 32,
        bounds: HttpBounds | None = None,
        shutdown_timeout: float = 5.0,
    ) -> None:
        bounds = bounds or HttpBounds()
        max_connections, header_timeout = bounds.max_connections, bounds.header_timeout
        body_timeout, keep_alive = bounds.body_timeout, bounds.keep_alive
        self.service = service
        self.tokens = tokens
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.shutdown_timeout = shutdown_timeout
        self.refusing = False
        self.giving_up = False  # set at the end of the grace period: calls in flight are cancelled
        self.pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="nuclick-http")
        self.openapi = json.dumps(openapi_document()).encode("utf-8")
        self._active = 0
        self._cancels: set[threading.Event] = set()
        self._lock = threading.Lock()
        self._sock = _listen(host, port)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            _App(self),
            http=BoundedH11Protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            headers=[("server", "nuclick-bridge")],
            timeout_keep_alive=int(max(1, keep_alive)),
            timeout_graceful_shutdown=int(max(1, shutdown_timeout)),
            h11_max_incomplete_event_size=MAX_HEAD,
        )
        config.bridge_limits = ConnectionLimits(  # type: ignore[attr-defined]
            max_connections=max_connections,
            header_timeout=header_timeout,
            handshake_timeout=header_timeout,
            tls=_tls_context(tls) if tls is not None else None,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------- lifecycle

    def start(self) -> HttpGateway:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, name="nuclick-http")
        self._thread.daemon = True
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise BridgeInputError(f"the HTTP server did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def refuse_new(self) -> None:
        self.refusing = True

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._active == 0:
                    return True
            time.sleep(0.02)
        with self._lock:
            return self._active == 0

    def close(self) -> None:
        """Stop: requests still in flight are cancelled and answered 503
        UNAVAILABLE (clients retry elsewhere), idle connections are closed."""
        self.refusing = True
        with self._lock:
            left = len(self._cancels)
            self.giving_up = True
            for cancel in self._cancels:
                cancel.set()
        if left:
            log_event("http calls cancelled at shutdown", logging.WARNING, calls=left)
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.shutdown_timeout + 5)
        self.pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(OSError):
            self._sock.close()
        log_event("http closed")

    # --------------------------------------------------- the app's counters

    def enter(self) -> None:
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1

    def track(self, cancel: threading.Event) -> None:
        with self._lock:
            self._cancels.add(cancel)
            if self.giving_up:
                cancel.set()

    def untrack(self, cancel: threading.Event) -> None:
        with self._lock:
            self._cancels.discard(cancel)

    def auth_failed(self, peer: str, reason: str, path: str) -> None:
        """A request with a missing or wrong token: counted and logged (rate-limited) as on gRPC."""
        record_auth_failure(self.service.metrics, peer, reason, "http", path)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that port 0's choice is known and a
    busy port is a clear error before anything starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise BridgeInputError(f"cannot listen for HTTP on {host}:{port} ({exc.strerror or exc})") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise BridgeInputError(f"cannot listen for HTTP on {host}:{port} ({exc.strerror or exc})") from exc
    sock.setblocking(False)
    return sock


def _tls_context(tls: tuple[bytes, bytes]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads files only; the PEMs are written to private temp files.
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert, tls[0]), (key, tls[1])):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        ctx.load_cert_chain(cert, key)
    return ctx
