"""The HTTP port against clients that misbehave: stalled and trickling
connections, many idle ones, slow bodies, malformed requests, and requests
still running when the server stops.  Real servers on 127.0.0.1, real sockets;
bounded in count and time (the long version is benchmarks/hostile.py)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest
from google.protobuf import json_format

from bridge.results import Click
from bridge.service.auth import TokenCheck
from bridge.service.convert import tile_to_pb
from bridge.service.core import Limits, SegmentService
from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.http import HttpBounds, HttpGateway
from bridge.service.server import NuClickServer
from support.models import DiscModel, Gate, engine_for
from support.waiting import wait_until

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _segment_body(n_clicks: int = 3) -> bytes:
    img = np.full((96, 96, 3), 230, np.uint8)
    req = pb.SegmentRequest(tile=tile_to_pb(img, (100.0, 200.0)), request_id="h1")
    for k in range(n_clicks):
        c = Click(120.5 + 20 * k, 240.5, f"c{k}")
        req.clicks.add(x=c.x, y=c.y, id=c.id)
    return json_format.MessageToJson(req, indent=None).encode()


def _ask(port: int, method: str, path: str, body: bytes | None = None, headers=None, timeout: float = 20.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _raw(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.fixture()
def gateway():
    """A gateway with short deadlines, over a real service, with a token."""
    service = SegmentService({"default": engine_for(DiscModel(), "disc")}, Limits(), auth_required=True)
    gw = HttpGateway(
        service,
        "127.0.0.1",
        0,
        TokenCheck(TOKEN),
        max_threads=4,
        bounds=HttpBounds(max_connections=300, header_timeout=1.0, body_timeout=1.5),
    ).start()
    yield gw
    gw.close()
    service.close()


def _stalled(port: int, n: int, body_byte: bool) -> list[socket.socket]:
    """``n`` connections without a token: a body that never ends (one byte of
    100 kB), or a request head that never ends."""
    socks = []
    for k in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if body_byte:
            s.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        else:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow-" + str(k).encode())
        socks.append(s)
    return socks


def test_stalled_and_trickling_connections_do_not_shut_out_anyone(gateway):
    """200 unauthenticated connections that stall in their body or their
    headers: /healthz and an authorised segment call are still answered (the
    server on http.server answered 429 to everything past 32)."""
    socks = _stalled(gateway.port, 100, body_byte=True) + _stalled(gateway.port, 100, body_byte=False)
    try:
        status, _, body = _ask(gateway.port, "GET", "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "SERVING"})
        status, _, body = _ask(gateway.port, "POST", "/v1/segment", _segment_body(), AUTH)
        assert status == 200, body
        assert [r["clickId"] for r in json.loads(body)["results"]] == ["c0", "c1", "c2"]
        # The stalled body got its 401 at once, from its head alone.
        socks[0].settimeout(5)
        assert socks[0].recv(4096).startswith(b"HTTP/1.1 401")
    finally:
        for s in socks:
            s.close()


def test_a_connection_that_never_finishes_its_request_head_is_closed(gateway):
    """Trickling a header byte at a time no longer keeps a connection: it must
    send a whole request head within the header deadline (1 s here)."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        closed_after = None
        t0 = time.monotonic()
        for k in range(40):  # up to 8 s of trickling, a byte every 0.2 s
            try:
                s.sendall(b"X-A: b\r\n"[k % 8 : k % 8 + 1])
            except OSError:
                closed_after = time.monotonic() - t0
                break
            s.settimeout(0.2)
            try:
                if s.recv(1) == b"":
                    closed_after = time.monotonic() - t0
                    break
            except TimeoutError:
                pass
        assert closed_after is not None, "the trickling connection was never closed"


def test_a_body_that_does_not_arrive_in_time_is_a_408_in_json(gateway):
    head = b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
    reply = _raw(gateway.port, head + b'\r\nContent-Length: 1000\r\n\r\n{"tile"')
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", reply
    doc = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert doc["code"] == "DEADLINE_EXCEEDED" and "did not arrive within 1.5 s (7 of 1000 bytes)" in doc["message"]


def test_many_idle_connections_cost_no_threads(gateway):
    """200 idle connections: the old server started a thread for each (224 threads)."""
    before = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", gateway.port), timeout=10) for _ in range(200)]
    try:
        status, _, _ = _ask(gateway.port, "GET", "/healthz")
        assert status == 200
        assert threading.active_count() - before < 10
    finally:
        for s in socks:
            s.close()


def test_connections_over_the_cap_are_closed_and_the_cap_frees_up():
    service = SegmentService({"default": engine_for(DiscModel(), "disc")}, Limits())
    bounds = HttpBounds(max_connections=5, header_timeout=1.0)
    gw = HttpGateway(service, "127.0.0.1", 0, TokenCheck(None), bounds=bounds).start()
    try:
        idle = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(5)]
        time.sleep(0.2)
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            _ask(gw.port, "GET", "/healthz", timeout=5)
        for s in idle:  # the header deadline closes them; then there is room again
            s.settimeout(5)
            assert s.recv(1) == b""
            s.close()
        time.sleep(0.2)
        assert _ask(gw.port, "GET", "/healthz")[0] == 200
    finally:
        gw.close()
        service.close()


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000, 400),  # a head over 64 kB, unfinished
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),  # ... whole
        (b"GET /healthz?" + b"q" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", 505),
        (b"PATCH /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405),
        (b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    ],
)
def test_every_error_is_json_and_the_server_header_names_no_version(raw, status):
    service = SegmentService({"default": engine_for(DiscModel(), "disc")}, Limits())
    gw = HttpGateway(service, "127.0.0.1", 0, TokenCheck(None)).start()
    try:
        reply = _raw(gw.port, raw)
        head, _, body = reply.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {status} "), reply[:200]
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        assert headers["content-type"] == "application/json"
        assert headers["server"] == "nuclick-bridge"
        doc = json.loads(body)
        assert set(doc) == {"code", "message"} and doc["message"]
    finally:
        gw.close()
        service.close()


def test_a_request_still_running_at_shutdown_gets_an_answer():
    """Past the grace period the call is cancelled and answered 503
    UNAVAILABLE in JSON (the old server dropped the connection)."""
    gate = Gate()
    srv = NuClickServer(engine_for(DiscModel(gate=gate), "disc"), port=0, http_port=0).start()
    got: dict = {}

    def call() -> None:
        got["reply"] = _ask(srv.http_port, "POST", "/v1/segment", _segment_body(1), timeout=30)

    caller = threading.Thread(target=call)
    caller.start()
    try:
        assert gate.entered.wait(20), "the call never reached the network"
        srv.stop(grace=0.5)
    finally:
        gate.opened.set()
    caller.join(30)
    status, _, body = got["reply"]
    assert status == 503, body
    assert json.loads(body) == {"code": "UNAVAILABLE", "message": "the server is shutting down"}


def test_openapi_describes_every_route_and_message(gateway):
    status, _, body = _ask(gateway.port, "GET", "/openapi.json")
    assert status == 200
    doc = json.loads(body)
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/v1/segment",
        "/v1/segmentStream",
        "/v1/model",
        "/healthz",
        "/metrics",
        "/openapi.json",
    }
    schemas = doc["components"]["schemas"]
    # The schema is the wire: every field of a request, under its JSON name.
    assert set(schemas["SegmentRequest"]["properties"]) == {f.json_name for f in pb.SegmentRequest.DESCRIPTOR.fields}
    assert schemas["Tile"]["properties"]["data"] == {"type": "string", "contentEncoding": "base64"}
    assert schemas["Tile_Encoding"]["enum"][0] == pb.Tile.Encoding.Name(0)
    ref = doc["paths"]["/v1/segment"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ref == {"$ref": "#/components/schemas/SegmentResponse"}


def test_busy_http_calls_wait_and_only_a_full_queue_answers_429_with_retry_after():
    """One compute slot and one place in the queue: a second call waits (and is
    answered), a third is refused with 429, RESOURCE_EXHAUSTED, a Retry-After
    header, and the refusal is counted."""
    gate = Gate()
    service = SegmentService(
        {"default": engine_for(DiscModel(gate=gate), "disc")}, Limits(max_queued_calls=1), workers=1
    )
    gw = HttpGateway(service, "127.0.0.1", 0, TokenCheck(None), max_threads=8).start()
    replies: list = []

    def call() -> None:
        replies.append(_ask(gw.port, "POST", "/v1/segment", _segment_body(1), timeout=60))

    callers = [threading.Thread(target=call) for _ in range(2)]
    try:
        callers[0].start()
        assert gate.entered.wait(20), "the first call never reached the network"
        callers[1].start()
        assert wait_until(lambda: service._admission.waiting >= 1), "the second call never queued"
        status, headers, body = _ask(gw.port, "POST", "/v1/segment", _segment_body(1))
        assert status == 429, body
        assert json.loads(body)["code"] == "RESOURCE_EXHAUSTED" and "queue is full" in json.loads(body)["message"]
        assert int(headers["retry-after"]) >= 1
    finally:
        gate.opened.set()
        for c in callers:
            c.join(60)
    assert [r[0] for r in replies] == [200, 200]
    assert service.metrics.refused.labels(reason="queue_full")._value.get() == 1
    gw.close()
    service.close()


def test_failed_tokens_over_http_are_counted(gateway):
    for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer wrong"}):
        assert _ask(gateway.port, "GET", "/v1/model", headers=header)[0] == 401
    metric = gateway.service.metrics.auth_failures
    assert metric.labels(port="http", reason="missing")._value.get() == 1
    assert metric.labels(port="http", reason="wrong")._value.get() == 2
