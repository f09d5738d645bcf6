"""Bearer-token checking for gRPC and HTTP, and TLS material.

The token is compared as SHA-256 digests with :func:`hmac.compare_digest`,
so neither its content nor its length leaks through response timing.
Health checks stay open (load balancers and ``grpc_health_probe`` carry no
token); every other method, reflection included, needs the token when one is
configured.

Every refused call is counted (``nuclick_auth_failures_total{port,reason}``)
and logged with its peer and reason, at most one line a second per port, and
never with the token: :func:`record_auth_failure`, for both transports.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from bridge.errors import BridgeInputError
from bridge.service.logs import Throttle

if TYPE_CHECKING:
    from bridge.service.metrics import ServiceMetrics

log = logging.getLogger("bridge.service")

OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
MISSING = "missing bearer token: send the header 'authorization: Bearer <token>'"
WRONG = "wrong bearer token"
# TokenCheck's reasons as metric labels.
REASON_LABELS = {MISSING: "missing", WRONG: "wrong"}
_fallback_throttle = Throttle(1.0)  # for callers without a server's metrics


def record_auth_failure(
    metrics: ServiceMetrics | None, peer: str | None, reason: str, port: str, method: str | None = None
) -> None:
    """Count and log one call refused for its token.

    ``reason`` is what :meth:`TokenCheck.check` returned (its label, ``missing``
    or ``wrong``, goes to the metric and the log; the header's value never
    does); ``port`` is ``"grpc"`` or ``"http"``; ``peer`` the client's address
    as the transport gives it; ``method`` the gRPC method or HTTP path.  The
    log line is rate-limited to one a second per port (with the count of the
    lines left out), so that a client guessing tokens cannot flood the log.
    """
    label = REASON_LABELS.get(reason, "other")
    if metrics is not None:
        metrics.auth_failures.labels(port=port, reason=label).inc()
    throttle = metrics.throttle if metrics is not None else _fallback_throttle
    throttle.log(log, f"auth:{port}", "auth failed", logging.WARNING, port=port, peer=peer, reason=label, method=method)


def read_token_file(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise BridgeInputError(f"token file not found: {p}")
    token = p.read_text(encoding="utf-8").strip()
    if not token:
        raise BridgeInputError(f"token file {p} is empty")
    if any(ch.isspace() for ch in token):
        raise BridgeInputError(f"token file {p} must hold one token with no spaces")
    return token


def read_tls(cert: str | Path | None, key: str | Path | None) -> tuple[bytes, bytes] | None:
    """(certificate chain PEM, private key PEM), or None when TLS is off."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise BridgeInputError("TLS needs both --tls-cert and --tls-key")
    out = []
    for what, path in (("certificate", cert), ("key", key)):
        p = Path(path)
        if not p.is_file():
            raise BridgeInputError(f"TLS {what} file not found: {p}")
        out.append(p.read_bytes())
    return out[0], out[1]


class TokenCheck:
    """``check(header_value)`` -> None if allowed, else the reason."""

    def __init__(self, token: str | None) -> None:
        self._digest = hashlib.sha256(token.encode("utf-8")).digest() if token else None

    @property
    def required(self) -> bool:
        return self._digest is not None

    def check(self, authorization: str | None) -> str | None:
        if self._digest is None:
            return None
        if not authorization:
            return MISSING
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return MISSING
        ok = hmac.compare_digest(hashlib.sha256(given.strip().encode("utf-8")).digest(), self._digest)
        return None if ok else WRONG


def _deny_handler(
    handler: grpc.RpcMethodHandler, reason: str, method: str, metrics: ServiceMetrics | None
) -> grpc.RpcMethodHandler:
    def deny(request, context):
        # Here, not in the interceptor: only the call's context knows the peer.
        record_auth_failure(metrics, context.peer(), reason, "grpc", method)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    return grpc.stream_stream_rpc_method_handler(deny, **kw)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call but health checks without the right token;
    refusals go to ``metrics`` and the log (:func:`record_auth_failure`)."""

    def __init__(self, check: TokenCheck, metrics: ServiceMetrics | None = None) -> None:
        self._check = check
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method in OPEN_METHODS:
            return continuation(handler_call_details)
        header = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                header = value
                break
        reason = self._check.check(header)
        handler = continuation(handler_call_details)
        if reason is None or handler is None:
            return handler
        return _deny_handler(handler, reason, handler_call_details.method, self._metrics)
