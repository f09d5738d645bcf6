"""Bearer-token checking for gRPC and HTTP, and TLS material.

The token is compared as SHA-256 digests with :func:`hmac.compare_digest`,
so neither its content nor its length leaks through response timing.
Health checks stay open (load balancers and ``grpc_health_probe`` carry no
token); every other method, reflection included, needs the token when one is
configured.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import grpc

from bridge.errors import BridgeInputError

OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
MISSING = "missing bearer token: send the header 'authorization: Bearer <token>'"
WRONG = "wrong bearer token"


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


def _deny_handler(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    def deny(request, context):
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
    def __init__(self, check: TokenCheck) -> None:
        self._check = check

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
        return _deny_handler(handler, reason)
