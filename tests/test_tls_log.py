"""Failed TLS handshakes are one JSON log line each, with the peer and the
reason, on both ports of a real ``nuclick-bridge serve``; its stderr stays one
JSON object per line (no socketserver tracebacks, no raw gRPC core lines).

gRPC Python offers no hook for a handshake that fails: the connection never
becomes a call.  The server turns on gRPC's ``handshaker`` tracer and routes
file descriptor 2 into its log (``bridge.service.logs.NativeStderr``), where
the tracer's record of the failed step, which names the peer, becomes the
event.  The HTTP gateway performs the handshake itself and logs its failure.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import time
import urllib.request

import pytest

from bridge.client import NuClickClient
from bridge.service.logs import native_event
from support.serve import ServeProcess

WEIGHTS = "bridge/weights/nuclick_default.pt"


def _address(hostport: str) -> tuple[str, int]:
    host, port = hostport.rsplit(":", 1)
    return host, int(port)


def plain_http(hostport: str) -> str:
    """An HTTP request in clear text to a TLS port; our side of the connection as gRPC names peers."""
    with socket.create_connection(_address(hostport), timeout=10) as s:
        me = f"ipv4:127.0.0.1:{s.getsockname()[1]}"
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(OSError):
            s.recv(100)  # the server hangs up (or sends a TLS alert)
    return me


def distrusting_tls(hostport: str) -> str:
    """A TLS client that does not trust the server's certificate and aborts the handshake."""
    with socket.create_connection(_address(hostport), timeout=10) as raw:
        me = f"ipv4:127.0.0.1:{raw.getsockname()[1]}"
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    return me


def test_failed_handshakes_are_one_json_line_each_with_the_peer(tls_pair):
    cert_pem, key_pem = tls_pair
    with ServeProcess(WEIGHTS, "--tls-cert", str(cert_pem), "--tls-key", str(key_pem)) as server:
        bad = {
            "grpc plain": plain_http(server.grpc),
            "grpc distrust": distrusting_tls(server.grpc),
            "http plain": plain_http(server.http),
            "http distrust": distrusting_tls(server.http),
        }
        # Good clients on both ports leave no handshake line.
        with NuClickClient(server.grpc, root_certificates=cert_pem, retries=0) as client:
            assert client.info().patch_size > 0
        ctx = ssl.create_default_context(cafile=str(cert_pem))
        with urllib.request.urlopen(f"https://{server.http}/healthz", context=ctx, timeout=10) as resp:
            assert resp.status == 200
        time.sleep(1.0)  # gRPC's records reach the log through a pipe
        server.signal(signal.SIGTERM)
        assert server.wait(60) == 0
    lines = [line for line in server.lines if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not one JSON object per line: {line!r}\nall of stderr:\n{''.join(lines)}")
    failed = [r for r in records if r["msg"] == "tls handshake failed"]
    by_peer = {r["peer"]: r for r in failed}
    assert len(failed) == len(by_peer) == 4, failed  # one line per failed connection, none for the good ones
    assert set(by_peer) == set(bad.values()), (by_peer, bad)
    for case, peer in bad.items():
        r = by_peer[peer]
        assert r["level"] == "warning" and r["port"] == case.split()[0], r
    assert "HTTP_REQUEST" in by_peer[bad["grpc plain"]]["reason"]
    assert "HTTP_REQUEST" in by_peer[bad["http plain"]]["reason"]
    assert "UNKNOWN_CA" in by_peer[bad["http distrust"]]["reason"]
    assert "Ssl handshake failed" in by_peer[bad["grpc distrust"]]["reason"]
    assert any(r["msg"] == "listening" for r in records) and records[-1]["msg"] == "stopped"


def test_grpc_core_records_become_events_or_are_dropped():
    """The tracer's records of successful steps are dropped, gRPC's peer-less
    duplicate too; the failed step becomes the event; other lines pass as text."""
    ok = (
        "CallNextHandshakerLocked: error=OK shutdown=false index=1, args={endpoint=0x1, "
        "args={grpc.internal.endpoint_peer_address=ipv4:10.0.0.7:40000}}"
    )
    assert native_event("handshaker.cc:155", ok) is None
    failed = (
        "CallNextHandshakerLocked: error=UNKNOWN: Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
        "error:1000009c:SSL routines:OPENSSL_internal:HTTP_REQUEST: OK\n=== Source Location Trace: ===\n"
        "src/core/util/status_helper.cc:68\n shutdown=false index=2, args={endpoint=0x1, args={"
        "grpc.internal.endpoint_local_address=ipv4:10.0.0.1:50051, grpc.internal.endpoint_peer_address=ipv6:[::1]:4}}"
    )
    msg, fields = native_event("handshaker.cc:155", failed)
    assert msg == "tls handshake failed" and fields["peer"] == "ipv6:[::1]:4" and fields["port"] == "grpc"
    assert fields["reason"].startswith("UNKNOWN: Ssl handshake failed") and "HTTP_REQUEST" in fields["reason"]
    assert native_event("ssl_transport_security.cc:2563", "Handshake failed with error SSL_ERROR_SSL: x") is None
    other = native_event("chttp2_server.cc:1", "Failed to add port")
    assert other == ("Failed to add port", {"source": "chttp2_server.cc:1"})
