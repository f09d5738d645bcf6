"""The HTTP/1.1 connection under the gateway: uvicorn's h11 protocol with the
bounds a server facing unknown clients needs.

uvicorn parses HTTP and runs the ASGI app; this subclass adds what it leaves
open, per connection:

- **a cap on open connections**: beyond it a new connection is closed at once
  (each costs a socket and a few kB, not a thread, so the cap is high);
- **a header deadline**: a connection must deliver a whole request head within
  ``header_timeout`` seconds of opening, and again after each answer (this
  also bounds a body left unread after an early error).  uvicorn's own
  keep-alive timer restarts on every byte, so a client trickling one byte at a
  time would otherwise hold its connection for ever;
- **the TLS handshake done here**, with ``loop.start_tls``, so a failed one is
  one ``tls handshake failed`` log line with the peer, as on the gRPC port
  (asyncio's own TLS server drops those silently);
- **errors in the JSON form** of every other error, where uvicorn answers a
  malformed request in plain text.

Everything above the connection (routes, tokens, bodies) is the ASGI app's,
in :mod:`bridge.service.http`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from bridge.service.core import log_event

log = logging.getLogger("bridge.service.http")


@dataclass(frozen=True)
class ConnectionLimits:
    """The per-connection bounds; see the module docstring."""

    max_connections: int = 1000
    header_timeout: float = 10.0
    handshake_timeout: float = 10.0
    tls: ssl.SSLContext | None = None


def peer_name(address) -> str:
    """The peer as gRPC names it (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``), for one vocabulary in the log."""
    if not address:
        return "unknown"
    host, port = address[0], address[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def handshake_reason(exc: BaseException) -> str:
    """OpenSSL's reason in a few words (``HTTP_REQUEST``: plain HTTP sent to the TLS port;
    ``TLSV1_ALERT_UNKNOWN_CA``: the client does not trust our certificate)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.strerror or exc.reason)
    if isinstance(exc, TimeoutError):
        return "the client did not finish the handshake in time"
    return str(exc) or type(exc).__name__


def error_bytes(code: str, message: str) -> bytes:
    """The body of every HTTP error: ``{"code": <gRPC status name>, "message": ...}``."""
    return json.dumps({"code": code, "message": message}).encode("utf-8")


class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a connection cap, a header deadline,
    its own TLS handshake and JSON errors (``config.bridge_limits``)."""

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = config.bridge_limits
        self._made = False  # whether uvicorn's connection_made has run (after TLS, if any)
        self._early: list[bytes] = []  # bytes decrypted before that
        self._header_timer: asyncio.TimerHandle | None = None
        self._handshake: asyncio.Task | None = None
        self._cycle_seen = None

    # ------------------------------------------------------------ opening

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        if len(self.connections) >= self.limits.max_connections:
            log_event(
                "http connection refused",
                logging.WARNING,
                peer=peer_name(peer),
                reason=f"over the limit of {self.limits.max_connections} open connections",
            )
            transport.abort()
            return
        if self.limits.tls is not None:
            self.connections.add(self)  # counted while it shakes hands
            self._handshake = self.loop.create_task(self._start_tls(transport, peer))
            return
        self._open(transport)

    async def _start_tls(self, transport: asyncio.Transport, peer) -> None:
        assert self.limits.tls is not None
        try:
            secure = await self.loop.start_tls(
                transport,
                self,
                self.limits.tls,
                server_side=True,
                ssl_handshake_timeout=self.limits.handshake_timeout,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            log_event(
                "tls handshake failed", logging.WARNING, port="http", peer=peer_name(peer), reason=handshake_reason(exc)
            )
            self.connections.discard(self)
            transport.abort()
            return
        except asyncio.CancelledError:
            self.connections.discard(self)
            transport.abort()
            raise
        if secure is None or secure.is_closing():
            self.connections.discard(self)
            return
        self._open(secure)

    def _open(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._made = True
        self._arm_header_timer()
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    # --------------------------------------------------------------- data

    def data_received(self, data: bytes) -> None:
        if not self._made:  # TLS: application data that came with the handshake's last flight
            self._early.append(data)
            return
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._cycle_seen:
            self._cycle_seen = self.cycle  # a whole request head arrived
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        # Armed before the next pipelined request (if any) is parsed, which disarms it.
        if not self.transport.is_closing():
            self._arm_header_timer()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._handshake is not None and not self._handshake.done():
            self._handshake.cancel()
        if not self._made:
            self.connections.discard(self)
            return
        super().connection_lost(exc)

    # ----------------------------------------------------------- deadlines

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # a request is being answered: the app's body deadline governs it
        log.debug("closing %s: no whole request within %.0f s", peer_name(self.client), self.limits.header_timeout)
        self.transport.close()

    # ------------------------------------------------------------- errors

    def send_400_response(self, msg: str) -> None:
        """A request uvicorn cannot parse (a bad request line, headers over the
        size limit): the JSON error body, then the connection is closed."""
        body = error_bytes("INVALID_ARGUMENT", f"malformed HTTP request: {msg}")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (
                h11.Response(
                    status_code=400, headers=headers + self.server_state.default_headers, reason=b"Bad Request"
                ),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass  # a response had already begun on this connection: only closing is left
        self.transport.close()
