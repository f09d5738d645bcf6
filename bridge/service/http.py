"""HTTP/JSON gateway: the gRPC methods for clients that cannot link gRPC
(QuPath scripts, the QuPath extension, curl).

Bodies use the proto3 JSON mapping (``google.protobuf.json_format``): field
names in lowerCamelCase (snake_case is accepted too), ``bytes`` as base64,
enums by name.  Routes:

    GET  /v1/model          -> GetModelInfoResponse
    POST /v1/segment        SegmentRequest -> SegmentResponse
    POST /v1/segmentStream  NDJSON, one SegmentRequest per line -> NDJSON of
                            SegmentResponse, chunked, in order; the size limit
                            applies to each line, as gRPC's to each message
    GET  /healthz           {"status": "SERVING"} (503 while shutting down)
    GET  /metrics           Prometheus' text format (bridge.service.metrics); it needs
                            the token like /v1/*, and still answers while draining

Errors carry the gRPC status name and the same message as over gRPC:
``{"code": "INVALID_ARGUMENT", "message": "..."}`` with the HTTP status of
:data:`bridge.service.convert.HTTP_STATUS` (413 for a body or tile over the
size limits).  ``Authorization: Bearer <token>`` is checked as on gRPC.
"""

from __future__ import annotations

import json
import logging
import ssl
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf import json_format

from bridge.errors import BridgeInputError
from bridge.service.auth import TokenCheck
from bridge.service.convert import HTTP_STATUS, ServiceError
from bridge.service.core import INTERNAL_STREAM, SegmentService, log_event
from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.metrics import CONTENT_TYPE_LATEST

log = logging.getLogger("bridge.service.http")

JSON = "application/json"
NDJSON = "application/x-ndjson"


def to_json(msg) -> bytes:
    return json_format.MessageToJson(msg, indent=None, always_print_fields_with_no_presence=True).encode("utf-8")


def parse_request(body: bytes | str) -> pb.SegmentRequest:
    try:
        return json_format.Parse(body, pb.SegmentRequest())
    except (json_format.ParseError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ServiceError("INVALID_ARGUMENT", f"request body is not a SegmentRequest in JSON: {exc}") from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    gateway: HttpGateway
    handshake_timeout = 30.0  # seconds a client gets to finish the TLS handshake

    def finish_request(self, request, client_address) -> None:
        """The TLS handshake, in the connection's own thread, before HTTP: a
        client that speaks plain HTTP to this port, distrusts our certificate
        or stalls is one "tls handshake failed" log line with its peer, not a
        traceback on stderr."""
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(self.handshake_timeout)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log_event(
                    "tls handshake failed",
                    logging.WARNING,
                    port="http",
                    peer=_peer(client_address),
                    reason=_handshake_reason(exc),
                )
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        """Anything else a connection raised outside our handlers (a reset
        mid-request, say): one log line with the peer, not socketserver's
        traceback on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, ssl.SSLError)):
            log_event("http connection dropped", logging.INFO, peer=_peer(client_address), reason=str(exc))
            return
        log.error("http connection failed", exc_info=True, extra={"fields": {"peer": _peer(client_address)}})


def _peer(client_address) -> str:
    """The peer as gRPC names it (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``), for one vocabulary in the log."""
    host, port = client_address[0], client_address[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _handshake_reason(exc: BaseException) -> str:
    """OpenSSL's reason in a few words (``HTTP_REQUEST``: plain HTTP sent to the TLS port;
    ``TLSV1_ALERT_UNKNOWN_CA``: the client does not trust our certificate)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.strerror or exc.reason)
    if isinstance(exc, TimeoutError):
        return "the client did not finish the handshake in time"
    return str(exc) or type(exc).__name__


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "nuclick-bridge"
    timeout = 60  # seconds a client may stall mid-request
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall
    _body_read = False  # whether this request's body was consumed (see _settle_body)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # ------------------------------------------------------------ replies

    def _send(self, status: int, body: bytes, content_type: str = JSON) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, exc: ServiceError) -> None:
        self._settle_body()
        status = exc.http_status or HTTP_STATUS.get(exc.code, 500)
        body = json.dumps({"code": exc.code, "message": exc.message}).encode("utf-8")
        self._send(status, body)

    def _settle_body(self) -> None:
        """Before an early error reply (401, 404, ...): read and drop the request
        body that nobody read, so the next request on this kept-alive connection
        starts where the client put it; a body that cannot be read (chunked,
        over the limit, cut short) closes the connection instead."""
        if self._body_read or self.close_connection:
            return
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            return
        if length is None:
            return  # no body
        try:
            left = int(length)
        except ValueError:
            self.close_connection = True
            return
        if left < 0 or left > self.server.gateway.max_body:
            self.close_connection = True
            return
        while left > 0:
            got = self.rfile.read(min(left, 1 << 20))
            if not got:
                self.close_connection = True
                return
            left -= len(got)
        self._body_read = True

    # ----------------------------------------------------------- requests

    def _content_length(self) -> int:
        """The request body's declared size; a body we cannot delimit closes the connection."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise ServiceError("INVALID_ARGUMENT", "send the body with a Content-Length header", http_status=411)
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise ServiceError("INVALID_ARGUMENT", f"bad Content-Length {length!r}") from None
        if n < 0:
            self.close_connection = True
            raise ServiceError("INVALID_ARGUMENT", f"bad Content-Length {length!r}")
        return n

    def _body(self) -> bytes:
        gw = self.server.gateway
        n = self._content_length()
        if n > gw.max_body:
            self.close_connection = True  # the body stays unread
            raise ServiceError(
                "RESOURCE_EXHAUSTED",
                f"request body of {n} bytes is over the limit of {gw.max_body} bytes: send smaller tiles",
                http_status=413,
            )
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise ServiceError("INVALID_ARGUMENT", f"request body ended after {len(data)} of {n} bytes")
        self._body_read = True
        return data

    def _stream_body(self, n: int) -> tempfile.SpooledTemporaryFile:
        """The ``n``-byte NDJSON body, read in full before answering (a client may
        send it all before it reads), into memory up to the size limit and into a
        temporary file beyond.  The limit applies to each line (one message, as on
        gRPC), not to the whole stream."""
        limit = self.server.gateway.max_body
        spool = tempfile.SpooledTemporaryFile(max_size=limit)  # noqa: SIM115 (the caller closes it)
        left = n
        try:
            while left > 0:
                line = self.rfile.readline(min(left, limit + 2))
                if not line:
                    self.close_connection = True
                    raise ServiceError("INVALID_ARGUMENT", f"request body ended after {n - left} of {n} bytes")
                left -= len(line)
                if len(line.rstrip(b"\r\n")) > limit:
                    self.close_connection = True  # the rest stays unread
                    raise ServiceError(
                        "RESOURCE_EXHAUSTED",
                        f"a line of the stream is over the limit of {limit} bytes per message: send smaller tiles",
                        http_status=413,
                    )
                spool.write(line if line.endswith(b"\n") else line + b"\n")
        except BaseException:
            spool.close()
            raise
        self._body_read = True
        spool.seek(0)
        return spool

    def _authorize(self) -> None:
        reason = self.server.gateway.tokens.check(self.headers.get("Authorization"))
        if reason is not None:
            raise ServiceError("UNAUTHENTICATED", reason)

    def _dispatch(self, method: str) -> None:
        gw = self.server.gateway
        path = self.path.split("?", 1)[0]
        routes = {
            ("GET", "/v1/model"): self._model,
            ("POST", "/v1/segment"): self._segment,
            ("POST", "/v1/segmentStream"): self._stream,
            ("GET", "/healthz"): self._health,
            ("GET", "/metrics"): self._metrics,
        }
        handler = routes.get((method, path))
        if handler is None:
            known = {p for _, p in routes}
            if path in known:
                raise ServiceError("UNIMPLEMENTED", f"{method} is not allowed on {path}", http_status=405)
            raise ServiceError("NOT_FOUND", f"no such route: {method} {path}")
        if path != "/healthz":
            if gw.refusing and path != "/metrics":  # a draining replica can still be watched
                self.close_connection = True
                raise ServiceError("UNAVAILABLE", "the server is shutting down")
            self._authorize()
        handler()

    def _run(self, method: str) -> None:
        gw = self.server.gateway
        self._body_read = False
        if not gw.enter():
            self.close_connection = True
            self._error(ServiceError("RESOURCE_EXHAUSTED", "too many HTTP requests at once; retry later"))
            return
        try:
            self._dispatch(method)
        except ServiceError as exc:
            self._error(exc)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            log.exception("HTTP %s %s failed", method, self.path)
            self.close_connection = True
            self._error(ServiceError("INTERNAL", "internal error; see the server log"))
        finally:
            gw.leave()

    def do_GET(self) -> None:
        self._run("GET")

    def do_POST(self) -> None:
        self._run("POST")

    def do_PUT(self) -> None:
        self._run("PUT")

    def do_DELETE(self) -> None:
        self._run("DELETE")

    # ------------------------------------------------------------- routes

    def _health(self) -> None:
        gw = self.server.gateway
        status = "NOT_SERVING" if gw.refusing else "SERVING"
        self._send(503 if gw.refusing else 200, json.dumps({"status": status}).encode())

    def _metrics(self) -> None:
        self._send(200, self.server.gateway.service.metrics.render(), CONTENT_TYPE_LATEST)

    def _model(self) -> None:
        self._send(200, to_json(self.server.gateway.service.model_info()))

    def _segment(self) -> None:
        req = parse_request(self._body())
        cancel = threading.Event()
        resp = self.server.gateway.service.segment(req, cancel)
        self._send(200, to_json(resp))

    def _stream(self) -> None:
        gw = self.server.gateway
        body = self._stream_body(self._content_length())
        try:
            gw.service.open_stream()
        except BaseException:
            body.close()
            raise
        cancel = threading.Event()
        try:
            requests = (_parse_line(line) for line in body if line.strip())
            self.send_response(200)
            self.send_header("Content-Type", NDJSON)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            # From here on the status line is gone: every error ends the body with an error
            # record (never a second HTTP response inside it) and closes the connection.
            try:
                for resp in gw.service.segment_stream(requests, cancel):
                    chunk = to_json(resp) + b"\n"
                    self.wfile.write(f"{len(chunk):X}\r\n".encode() + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except ServiceError as exc:
                self._end_stream_with(exc)
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception:
                log.exception("HTTP stream failed")
                self._end_stream_with(ServiceError("INTERNAL", INTERNAL_STREAM))
        finally:
            cancel.set()
            gw.service.close_stream()
            body.close()

    def _end_stream_with(self, exc: ServiceError) -> None:
        line = json.dumps({"error": {"code": exc.code, "message": exc.message}}).encode() + b"\n"
        self.close_connection = True
        self.wfile.write(f"{len(line):X}\r\n".encode() + line + b"\r\n0\r\n\r\n")


def _parse_line(line: bytes) -> pb.SegmentRequest | ServiceError:
    try:
        return parse_request(line)
    except ServiceError as exc:
        return exc


class HttpGateway:
    """A ThreadingHTTPServer in a background thread, over ``service``."""

    def __init__(
        self,
        service: SegmentService,
        host: str,
        port: int,
        tokens: TokenCheck,
        tls: tuple[bytes, bytes] | None = None,
        max_body: int = 64 << 20,
        max_threads: int = 32,
    ) -> None:
        self.service = service
        self.tokens = tokens
        self.max_body = max_body
        self.max_threads = max_threads
        self.refusing = False
        self._active = 0
        self._lock = threading.Lock()
        try:
            self._httpd = _Server((host, port), _Handler, bind_and_activate=True)
        except OSError as exc:
            raise BridgeInputError(f"cannot listen for HTTP on {host}:{port} ({exc.strerror or exc})") from exc
        self._httpd.gateway = self
        if tls is not None:
            # The handshake happens in the request's thread, not in the accept loop.
            self._httpd.socket = _tls_context(tls).wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> HttpGateway:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="nuclick-http", daemon=True)
        self._thread.start()
        return self

    def enter(self) -> bool:
        with self._lock:
            if self._active >= self.max_threads:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._active -= 1

    def refuse_new(self) -> None:
        self.refusing = True

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._active == 0:
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        log_event("http closed")


def _tls_context(tls: tuple[bytes, bytes]) -> ssl.SSLContext:
    import os
    import tempfile

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
