"""Random requests against a real server: no crash, no hang; every reply is
a valid answer or a clean INVALID_ARGUMENT / RESOURCE_EXHAUSTED, the same
over gRPC and HTTP/JSON."""

from __future__ import annotations

import io
import json
import math
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from bridge.service.convert import HTTP_STATUS, polygon_from_pb
from bridge.service.core import Limits
from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.gen import nuclick_pb2_grpc as pb_grpc
from bridge.service.server import NuClickServer
from support.models import DiscModel, engine_for

CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(
    max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def server():
    limits = Limits(max_clicks_per_request=8, max_tile_side=256, max_message_bytes=1 << 20)
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=0, limits=limits).start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        yield pb_grpc.NuClickStub(ch)


odd_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 2.0, 0.25, 0.5, -1.0, 1e-9, 1e9]),
)


def _pixels(seed: int, w: int, h: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (max(h, 1), max(w, 1), 3), dtype=np.uint8)


def _rarely(draw, common, rare):
    """``common`` nine times in ten, else ``rare``."""
    return draw(rare) if draw(st.integers(0, 9)) == 0 else draw(common)


@st.composite
def requests(draw) -> pb.SegmentRequest:
    w = _rarely(draw, st.integers(1, 72), st.sampled_from([0, 300, 2**32 - 1]))
    h = _rarely(draw, st.integers(1, 72), st.sampled_from([0, 257]))
    seed = draw(st.integers(0, 1000))
    kind = _rarely(draw, st.sampled_from(["raw", "png"]), st.sampled_from(["random", "truncated", "empty"]))
    match = {"raw": 1, "png": 2}.get(kind, 0)
    encoding = _rarely(draw, st.sampled_from([match, 0]), st.sampled_from([1, 2, 3, 9]))
    small = (min(w, 80), min(h, 80))
    if kind == "raw":
        data = _pixels(seed, *small).tobytes()
    elif kind in ("png", "truncated"):
        buf = io.BytesIO()
        Image.fromarray(_pixels(seed, *small)).save(buf, format="PNG")
        data = buf.getvalue()
        if kind == "truncated":
            data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "random":
        data = draw(st.binary(max_size=300))
    else:
        data = b""
    tile = pb.Tile(encoding=encoding, data=data, width=w, height=h)
    sane = st.floats(-1e6, 1e6)
    if draw(st.booleans()):
        tile.origin_x, tile.origin_y = _rarely(draw, sane, odd_floats), _rarely(draw, sane, odd_floats)
    if draw(st.booleans()):
        tile.downsample = _rarely(draw, st.sampled_from([1.0, 2.0, 0.5, 4.0, 1.7]), odd_floats)
    if draw(st.booleans()):
        tile.pixel_size_um = _rarely(draw, st.sampled_from([0.0, 0.25, 0.5, 0.2, 0.13]), odd_floats)
    req = pb.SegmentRequest(tile=tile, request_id=draw(st.text(max_size=5)))
    d = tile.downsample if math.isfinite(tile.downsample) and tile.downsample > 0 else 1.0
    ids = iter(draw(st.permutations(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"])))
    for _ in range(_rarely(draw, st.integers(0, 6), st.integers(7, 12))):
        if _rarely(draw, st.just(True), st.just(False)):  # mostly near or inside the tile
            fx, fy = draw(st.floats(-0.1, 1.1)), draw(st.floats(-0.1, 1.1))
            ox = tile.origin_x if math.isfinite(tile.origin_x) else 0.0
            oy = tile.origin_y if math.isfinite(tile.origin_y) else 0.0
            x, y = ox + fx * w * d, oy + fy * h * d
        else:
            x, y = draw(odd_floats), draw(odd_floats)
        req.clicks.add(
            x=x,
            y=y,
            id=_rarely(draw, st.just(next(ids)), st.sampled_from(["", "a", "ü", "a b"])),
            class_name=draw(st.sampled_from(["", "Tumor", "x" * 50])),
            context_only=_rarely(draw, st.just(False), st.just(True)),
        )
    if draw(st.booleans()):
        req.simplify_tolerance = _rarely(draw, st.floats(0, 3), odd_floats)
    return req


def _check_answer(req: pb.SegmentRequest, resp: pb.SegmentResponse) -> None:
    asked = [c.id for c in req.clicks if not c.context_only]
    assert [r.click_id for r in resp.results] == asked
    assert resp.request_id == req.request_id
    for r in resp.results:
        if r.found:
            poly = polygon_from_pb(r.polygon)
            assert poly.is_valid and poly.area > 0 and all(math.isfinite(v) for v in poly.bounds)
        else:
            assert r.reason


@FUZZ
@given(req=requests())
def test_random_grpc_requests_get_an_answer_or_a_clean_error(stub, req):
    try:
        resp = stub.Segment(req, timeout=30)
    except grpc.RpcError as err:
        assert err.code() in CLEAN, (err.code(), err.details())
        assert err.details()
        event(err.code().name + " " + " ".join(err.details().split()[:3]))
    else:
        _check_answer(req, resp)
        event("OK")


def _post(port: int, body: bytes) -> tuple[int, bytes]:
    r = urllib.request.Request(f"http://127.0.0.1:{port}/v1/segment", data=body, method="POST")
    try:
        with urllib.request.urlopen(r, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(req=requests())
def test_http_gives_the_same_outcome_as_grpc(server, stub, req):
    status, body = _post(server.http_port, json_format.MessageToJson(req).encode())
    try:
        expected = stub.Segment(req, timeout=30)
    except grpc.RpcError as err:
        doc = json.loads(body)
        assert doc["code"] == err.code().name and doc["message"] == err.details()
        assert status in (HTTP_STATUS[err.code().name], 413)
    else:
        assert status == 200
        assert json_format.Parse(body, pb.SegmentResponse()) == expected


@settings(max_examples=60, deadline=None, derandomize=True)
@given(body=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode), st.just(b"{}")))
def test_random_http_bodies_are_refused_cleanly(server, body):
    status, out = _post(server.http_port, body)
    doc = json.loads(out)  # none of these holds a tile, so every one is refused
    assert status == 400 and doc["code"] == "INVALID_ARGUMENT" and doc["message"]


def test_the_server_is_healthy_after_the_fuzzing(stub):
    req = pb.SegmentRequest(tile=pb.Tile(encoding=pb.Tile.RAW_RGB8, data=bytes(64 * 64 * 3), width=64, height=64))
    req.clicks.add(x=32.5, y=32.5, id="ok")
    resp = stub.Segment(req, timeout=30)
    assert resp.results[0].click_id == "ok" and resp.results[0].found
