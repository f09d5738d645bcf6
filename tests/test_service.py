"""The gRPC contract against a real server on 127.0.0.1: model info, real
tiles in and polygons out, coordinates, resampling, encodings, every kind of
bad input, HTTP/JSON, tokens, TLS, health and reflection, streams."""

from __future__ import annotations

import http.client
import io
import json
import queue
import ssl
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from shapely import affinity
from shapely.geometry import Point, box

from bridge.evaluation.clicks import simulate_clicks
from bridge.io.imageio import ArrayReader
from bridge.model.network import NuClickNet
from bridge.model.weights import load_model, save_weights
from bridge.nuclick.engine import NuClickEngine
from bridge.results import Click
from bridge.service.convert import polygon_from_pb, tile_to_pb
from bridge.service.core import Limits
from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.gen import nuclick_pb2_grpc as pb_grpc
from bridge.service.server import NuClickServer
from support.models import DiscModel, engine_for

ORIGIN = (5000.0, 7000.0)
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server():
    srv = NuClickServer(
        engine_for(DiscModel(), "disc"), port=0, http_port=0, limits=Limits(max_clicks_per_request=50)
    ).start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield pb_grpc.NuClickStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def tile(crop_pair):
    """A real 160x128 tile and one click per labelled nucleus, in level 0."""
    img, lab = crop_pair
    tile = np.ascontiguousarray(img[:128, :160])
    xy, _ = simulate_clicks(lab[:128, :160], jitter=0, seed=0)
    clicks = [Click(ORIGIN[0] + x, ORIGIN[1] + y, f"n{k}", "Tumor" if k % 2 else None) for k, (x, y) in enumerate(xy)]
    assert len(clicks) >= 5
    return tile, clicks


def request(tile: np.ndarray, clicks, origin=ORIGIN, **tile_kw) -> pb.SegmentRequest:
    req = pb.SegmentRequest(tile=tile_to_pb(tile, origin, **tile_kw), request_id="r1")
    for c in clicks:
        req.clicks.add(x=c.x, y=c.y, id=c.id, class_name=c.class_name or "")
    return req


def code_of(stub, req) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.Segment(req, timeout=30)
    return info.value.code(), info.value.details()


# ------------------------------------------------------------------ contract


def test_model_info_reports_model_device_and_limits(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert (info.model.name, info.model.version, info.model.patch_size) == ("disc", "test", 128)
    assert info.model.pixel_size_um == pytest.approx(0.25) and info.model.threshold == pytest.approx(0.4)
    assert info.device == "cpu" and info.server_version
    assert info.limits.max_clicks_per_request == 50 and info.limits.max_tile_side == 4096
    assert info.limits.max_message_bytes == 64 << 20 and not info.limits.auth_required


def test_segment_real_tile_answers_every_click_in_level0(stub, tile):
    img, clicks = tile
    resp = stub.Segment(request(img, clicks), timeout=30)
    assert resp.request_id == "r1" and resp.resample_factor == 1.0 and resp.model == "disc test"
    assert [r.click_id for r in resp.results] == [c.id for c in clicks]
    assert [r.class_name for r in resp.results] == [c.class_name or "" for c in clicks]
    bounds = box(ORIGIN[0], ORIGIN[1], ORIGIN[0] + 160, ORIGIN[1] + 128)
    for r, c in zip(resp.results, clicks, strict=True):
        assert r.found, r.reason
        poly = polygon_from_pb(r.polygon)
        assert poly.is_valid and bounds.buffer(1e-9).contains(poly)
        assert poly.distance(Point(c.x, c.y)) < 1.0
        assert r.area_px == pytest.approx(poly.area) and 0.4 < r.score <= 1.0


def test_results_equal_the_in_process_engine_with_a_real_network(tmp_path, tile):
    """A real (random) NuClickNet from a weights file: the server's answer is
    the engine's answer on the same tile, shifted to level 0."""
    torch.manual_seed(0)
    path = tmp_path / "w.pt"
    save_weights(path, NuClickNet(0.125), {"name": "rand", "threshold": 0.5})
    img, clicks = tile
    clicks = clicks[:6]
    local = [Click(c.x - ORIGIN[0], c.y - ORIGIN[1], c.id) for c in clicks]
    expected = NuClickEngine.load(path, device="cpu").segment(ArrayReader(img), local).results
    srv = NuClickServer(NuClickEngine.load(path, device="cpu"), port=0, http_port=None).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            resp = pb_grpc.NuClickStub(ch).Segment(request(img, clicks), timeout=120)
            model_info = pb_grpc.NuClickStub(ch).GetModelInfo(pb.GetModelInfoRequest()).model
            assert model_info.sha256 == load_model(path)[1].sha256
            assert model_info.arch == "nuclick-w0.125", "the architecture recorded in the weights file"
    finally:
        srv.stop(grace=1)
    assert any(e.found for e in expected)
    for got, exp in zip(resp.results, expected, strict=True):
        assert got.found == exp.found
        if exp.found:
            shifted = polygon_from_pb(got.polygon)
            assert shifted.equals_exact(affinity.translate(exp.polygon, *ORIGIN), tolerance=1e-6)
            assert got.score == pytest.approx(exp.score, abs=1e-5)


def disc_pixels(model: DiscModel, threshold: float = 0.4) -> int:
    """Model pixels DiscModel marks as nucleus around a click on a pixel corner:
    pixel centres at half-integer offsets whose probability is over the
    threshold, from the model's own definition (independent of the server)."""
    offsets = np.arange(-12, 12) + 0.5
    dx, dy = np.meshgrid(offsets, offsets)
    prob = 1 / (1 + np.exp(-50.0 * (np.exp(-(dx**2 + dy**2) / 8.0) - model.level)))
    assert np.abs(prob - threshold).min() > 1e-3  # no pixel on the fence: float32 cannot flip one
    return int((prob > threshold).sum())


def test_downsample_and_pixel_size_bring_tiles_to_the_model_scale(stub):
    """With simplification off, a nucleus's area is its model pixel count times
    the area one model pixel covers in level 0, exactly: so the area checks the
    scale the server chose, to the pixel."""
    img = np.full((96, 96, 3), 180, np.uint8)
    n = disc_pixels(DiscModel())  # 88: a disc of radius ~5.2 model px

    def area(downsample, **kw):
        c = Click(ORIGIN[0] + 48.0 * downsample, ORIGIN[1] + 48.0 * downsample, "c")  # the tile's centre
        req = request(img, [c], downsample=downsample, **kw)
        req.simplify_tolerance = 0.0  # the exact union of the mask's pixels
        resp = stub.Segment(req, timeout=30)
        r = resp.results[0]
        assert r.found, r.reason
        poly = polygon_from_pb(r.polygon)
        assert poly.centroid.distance(Point(c.x, c.y)) < 1e-9  # symmetric about the click
        assert r.area_px == pytest.approx(poly.area, abs=1e-9)
        return r.area_px, resp.resample_factor

    base, f = area(downsample=2.0)  # no pixel size: the tile is used as it is, a model px is 2x2 level-0 px
    assert f == 1.0 and base == pytest.approx(4 * n, abs=1e-9)
    near, f = area(downsample=2.0, pixel_size_um=0.13)  # 0.26 um: within 10% of the model's 0.25
    assert f == 1.0 and near == base
    half, f = area(downsample=2.0, pixel_size_um=0.25)  # tile pixels are 0.5 um: enlarged x2, model px = level-0 px
    assert f == pytest.approx(2.0) and half == pytest.approx(n, abs=1e-9)
    small, f = area(downsample=1.0, pixel_size_um=0.125)  # tile finer than the model: shrunk x0.5
    assert f == pytest.approx(0.5) and small == pytest.approx(4 * n, abs=1e-9)


def test_png_and_jpeg_tiles(stub, tile):
    img, clicks = tile
    raw = stub.Segment(request(img, clicks), timeout=30)
    png = stub.Segment(request(img, clicks, encoding="png"), timeout=30)
    jpg = stub.Segment(request(img, clicks, encoding="jpeg"), timeout=30)
    assert png.results == raw.results  # lossless: identical answers
    assert [r.click_id for r in jpg.results] == [c.id for c in clicks] and all(r.found for r in jpg.results)
    unspecified = request(img, clicks, encoding="png")
    unspecified.tile.encoding = pb.Tile.ENCODING_UNSPECIFIED  # sniffed from the PNG signature
    assert stub.Segment(unspecified, timeout=30).results == raw.results


def test_context_clicks_get_no_result_and_may_lie_outside_the_tile(stub, tile):
    img, clicks = tile
    req = request(img, clicks[:2])
    req.clicks.add(x=ORIGIN[0] - 30, y=ORIGIN[1] + 5, id="ctx", context_only=True)
    resp = stub.Segment(req, timeout=30)
    assert [r.click_id for r in resp.results] == [clicks[0].id, clicks[1].id]


# ----------------------------------------------------------------- bad input


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _bad_requests(img: np.ndarray, clicks: list[Click]):
    """(name, request, expected code, words in the reason)"""
    ok = request(img, clicks)
    h, w = img.shape[:2]

    def edited(fn):
        req = pb.SegmentRequest()
        req.CopyFrom(ok)
        fn(req)
        return req

    png = _png(img)
    inv, big = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED

    def set_tile(req, **kw):
        for k, v in kw.items():
            setattr(req.tile, k, v)

    def add(req, **kw):
        req.clicks.add(**kw)

    return [
        ("truncated png", edited(lambda r: set_tile(r, encoding=pb.Tile.PNG, data=png[: len(png) // 2])), inv, "PNG"),
        ("garbage png", edited(lambda r: set_tile(r, encoding=pb.Tile.PNG, data=b"\x89PNG garbage" * 9)), inv, "PNG"),
        ("garbage unknown", edited(lambda r: set_tile(r, encoding=0, data=b"nonsense")), inv, "neither"),
        ("raw truncated", edited(lambda r: set_tile(r, data=r.tile.data[:-7])), inv, "bytes"),
        ("wrong width", edited(lambda r: set_tile(r, width=w + 1)), inv, "bytes"),
        ("png wrong size", edited(lambda r: set_tile(r, encoding=pb.Tile.PNG, data=png, height=h - 1)), inv, "says"),
        ("empty tile", edited(lambda r: set_tile(r, width=0, height=0, data=b"")), inv, "empty"),
        ("no data", edited(lambda r: set_tile(r, data=b"")), inv, "no pixel data"),
        ("no tile", edited(lambda r: r.ClearField("tile")), inv, "empty"),
        ("click outside", edited(lambda r: add(r, x=ORIGIN[0] + w + 3, y=ORIGIN[1] + 1, id="out")), inv, "outside"),
        ("click left of tile", edited(lambda r: add(r, x=ORIGIN[0] - 0.01, y=ORIGIN[1] + 1, id="o")), inv, "outside"),
        ("nan", edited(lambda r: add(r, x=float("nan"), y=ORIGIN[1], id="nan")), inv, "non-finite"),
        ("inf", edited(lambda r: add(r, x=ORIGIN[0], y=float("inf"), id="inf")), inv, "non-finite"),
        ("duplicate id", edited(lambda r: add(r, x=ORIGIN[0] + 1, y=ORIGIN[1] + 1, id=clicks[0].id)), inv, "twice"),
        ("missing id", edited(lambda r: add(r, x=ORIGIN[0] + 1, y=ORIGIN[1] + 1)), inv, "no id"),
        ("bad downsample", edited(lambda r: set_tile(r, downsample=-2.0)), inv, "downsample"),
        ("nan origin", edited(lambda r: set_tile(r, origin_x=float("nan"))), inv, "origin"),
        ("bad pixel size", edited(lambda r: set_tile(r, pixel_size_um=-0.5)), inv, "pixel_size_um"),
        ("bad tolerance", edited(lambda r: setattr(r, "simplify_tolerance", 1e9)), inv, "simplify_tolerance"),
        (
            "too many clicks",
            edited(lambda r: [add(r, x=ORIGIN[0] + 1, y=ORIGIN[1] + 1, id=f"x{k}") for k in range(60)]),
            big,
            "limit is 50",
        ),
        ("tile too large", edited(lambda r: set_tile(r, width=5000, height=10, data=b"")), big, "limit is 4096"),
        (
            "resampled too large",
            edited(lambda r: set_tile(r, pixel_size_um=8.0)),
            big,
            "model's pixel size",
        ),
    ]


def test_bad_requests_get_a_clean_status_with_a_reason_and_the_server_carries_on(stub, tile):
    img, clicks = tile
    for name, req, code, words in _bad_requests(img, clicks):
        got, details = code_of(stub, req)
        assert got == code, (name, got, details)
        assert words in details, (name, details)
    oversized = request(np.zeros((4096, 4096 + 1024, 3), np.uint8)[:, :4096], [])  # 48 MiB raw
    oversized.tile.data += bytes(20 << 20)  # over the 64 MiB message limit
    got, details = code_of(stub, oversized)
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    # ... and a valid request still gets the right answer.
    resp = stub.Segment(request(img, clicks), timeout=30)
    assert [r.click_id for r in resp.results] == [c.id for c in clicks] and all(r.found for r in resp.results)


def test_zero_clicks_is_an_empty_answer(stub, tile):
    img, _ = tile
    assert list(stub.Segment(request(img, []), timeout=30).results) == []


# ---------------------------------------------------------------------- HTTP


def _http(port: int, path: str, body: bytes | None = None, headers=None, scheme="http", context=None):
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}", data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _json(msg) -> bytes:
    return json_format.MessageToJson(msg).encode()


def test_http_json_gives_the_same_answers_and_errors_as_grpc(server, stub, tile):
    img, clicks = tile
    req = request(img, clicks)
    status, body = _http(server.http_port, "/v1/segment", _json(req), {"Content-Type": "application/json"})
    assert status == 200
    doc = json.loads(body)
    assert doc["requestId"] == "r1" and doc["results"][0]["clickId"] == clicks[0].id
    assert json_format.Parse(body, pb.SegmentResponse()) == stub.Segment(req, timeout=30)

    status, body = _http(server.http_port, "/v1/model")
    assert status == 200 and json.loads(body)["model"]["pixelSizeUm"] == 0.25
    assert json.loads(body)["limits"]["maxMessageBytes"] == 64 << 20

    for name, bad, _code, _words in _bad_requests(img, clicks)[:16]:
        status, body = _http(server.http_port, "/v1/segment", _json(bad))
        doc = json.loads(body)
        assert (status, doc["code"]) == (400, "INVALID_ARGUMENT"), name
        assert doc["message"] == code_of(stub, bad)[1], name
    status, body = _http(server.http_port, "/v1/segment", b'{"tile": {"width": "many"}}')
    assert status == 400 and "not a SegmentRequest" in json.loads(body)["message"]
    status, body = _http(server.http_port, "/v1/segment", b"\xff\xfe not json")
    assert status == 400
    status, body = _http(server.http_port, "/v1/nothing")
    assert status == 404 and json.loads(body)["code"] == "NOT_FOUND"
    status, _ = _http(server.http_port, "/v1/model", b"{}")
    assert status == 405
    status, _ = _http(server.http_port, "/healthz")
    assert status == 200


def test_http_body_over_the_limit_is_413_without_reading_it(tile):
    img, clicks = tile
    srv = NuClickServer(
        engine_for(DiscModel(), "disc"), port=0, http_port=0, limits=Limits(max_message_bytes=50_000)
    ).start()
    try:
        body = _json(request(img, clicks))
        assert len(body) > 50_000
        status, out = _http(srv.http_port, "/v1/segment", body)
        assert status == 413 and json.loads(out)["code"] == "RESOURCE_EXHAUSTED"
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            got, _ = code_of(pb_grpc.NuClickStub(ch), request(img, clicks))
        assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        srv.stop(grace=1)


def test_http_stream_answers_ndjson_lines_in_order(server, tile):
    img, clicks = tile
    lines = []
    for k in range(3):
        req = request(img, clicks[k : k + 2])
        req.request_id = f"t{k}"
        lines.append(json_format.MessageToJson(req, indent=None).encode())
    lines.insert(1, b'{"tile": 5}')
    status, body = _http(server.http_port, "/v1/segmentStream", b"\n".join(lines))
    assert status == 200
    out = [json.loads(line) for line in body.splitlines()]
    assert [o["requestId"] for o in out] == ["t0", "", "t1", "t2"]
    assert out[1]["error"]["code"] == "INVALID_ARGUMENT"
    assert [r["clickId"] for r in out[3]["results"]] == [clicks[2].id, clicks[3].id]


def test_an_early_error_reply_leaves_a_kept_alive_connection_usable(tile):
    """A 401 (or 404, 405) is sent before the body is read: the server reads and
    drops that body, so the client's next request on the same connection is
    understood (it used to get '400 Bad request syntax' from the leftover body)."""
    img, clicks = tile
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=0, token=TOKEN).start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
    try:
        body = _json(request(img, clicks))
        good = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        conn.request("POST", "/v1/segment", body, {"Authorization": "Bearer nope"})
        sock = conn.sock
        resp = conn.getresponse()
        assert resp.status == 401 and json.loads(resp.read())["code"] == "UNAUTHENTICATED"
        assert resp.getheader("Connection") != "close"
        for path, status in (("/v1/segment", 200), ("/v1/nothing", 404), ("/v1/model", 405), ("/v1/segment", 200)):
            conn.request("POST", path, body, good)
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            assert resp.status == status, (path, doc)
            assert conn.sock is sock, "the connection was not kept alive"
        assert [r["clickId"] for r in doc["results"]] == [c.id for c in clicks]
    finally:
        conn.close()
        srv.stop(grace=1)


def test_an_unexpected_error_in_a_stream_ends_it_with_an_internal_error(tile, monkeypatch):
    """A bug while a stream is answered (here: one request's handler raises)
    ends the stream with INTERNAL and no detail of the bug: gRPC's status, and
    over HTTP a last NDJSON error record in a well-formed chunked body, never a
    second HTTP response inside it.  The server goes on serving."""
    img, clicks = tile
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=0).start()
    real = srv.service.segment_one

    def segment_one(req, cancel):
        if req.request_id == "boom":
            raise RuntimeError("a bug with a secret detail")
        return real(req, cancel)

    monkeypatch.setattr(srv.service, "segment_one", segment_one)
    reqs = []
    for rid in ("s0", "boom", "s2"):
        reqs.append(request(img, clicks[:1]))
        reqs[-1].request_id = rid
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            stub = pb_grpc.NuClickStub(ch)
            got = []
            with pytest.raises(grpc.RpcError) as info:
                for resp in stub.SegmentStream(iter(reqs), timeout=60):
                    got.append(resp)
            assert [r.request_id for r in got] == ["s0"] and got[0].results[0].found
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert info.value.details() == "internal error in the stream; see the server log"
            assert len(stub.Segment(request(img, clicks[:1]), timeout=30).results) == 1

        conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
        try:
            conn.request("POST", "/v1/segmentStream", b"\n".join(_json(r).replace(b"\n", b"") for r in reqs))
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
            body = resp.read()  # http.client decodes the chunks: a response inside the body would break them
        finally:
            conn.close()
        assert b"HTTP/1." not in body
        lines = [json.loads(line) for line in body.splitlines()]
        assert [line.get("requestId") for line in lines[:-1]] == ["s0"]
        internal = {"code": "INTERNAL", "message": "internal error in the stream; see the server log"}
        assert lines[-1] == {"error": internal}
        assert _http(srv.http_port, "/v1/model")[0] == 200
    finally:
        srv.stop(grace=1)


def test_http_stream_size_limit_applies_per_line_as_on_grpc(tile):
    """/v1/segmentStream's limit is per message (one NDJSON line), as gRPC's is:
    a stream larger than the limit in total is answered; a line over it is a 413."""
    img, _ = tile
    limit = 50_000
    srv = NuClickServer(
        engine_for(DiscModel(), "disc"), port=0, http_port=0, limits=Limits(max_message_bytes=limit)
    ).start()
    try:
        small = []
        for k in range(5):
            req = request(img[:64, :64], [Click(ORIGIN[0] + 20.5 + 5 * k, ORIGIN[1] + 30.5, f"m{k}")])
            req.request_id = f"t{k}"
            small.append(req)
        lines = [json_format.MessageToJson(r, indent=None).encode() for r in small]
        assert all(len(line) < limit for line in lines) and sum(map(len, lines)) > limit
        status, body = _http(srv.http_port, "/v1/segmentStream", b"\n".join(lines))
        assert status == 200, body
        out = [json.loads(line) for line in body.splitlines()]
        assert [o["requestId"] for o in out] == [f"t{k}" for k in range(5)]
        assert all(o["results"][0]["found"] for o in out)
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:  # the same stream over gRPC
            got = list(pb_grpc.NuClickStub(ch).SegmentStream(iter(small), timeout=60))
        assert [json_format.ParseDict(o, pb.SegmentResponse()) for o in out] == got

        big = json_format.MessageToJson(request(img, []), indent=None).encode()  # 160x128 raw: over 50 kB
        assert len(big) > limit
        status, body = _http(srv.http_port, "/v1/segmentStream", lines[0] + b"\n" + big)
        doc = json.loads(body)
        assert (status, doc["code"]) == (413, "RESOURCE_EXHAUSTED")
        assert doc["message"] == (
            f"a line of the stream is over the limit of {limit} bytes per message: send smaller tiles"
        )
    finally:
        srv.stop(grace=1)


# ---------------------------------------------------------------- streaming


def test_stream_answers_in_order_and_a_bad_request_does_not_end_it(stub, tile):
    img, clicks = tile
    reqs = []
    for k in range(5):
        req = request(img, clicks[k : k + 1])
        req.request_id = f"s{k}"
        reqs.append(req)
    reqs[2].clicks[0].x = float("nan")
    out = list(stub.SegmentStream(iter(reqs), timeout=60))
    assert [o.request_id for o in out] == [f"s{k}" for k in range(5)]
    assert out[2].error.code == "INVALID_ARGUMENT" and "non-finite" in out[2].error.message
    for k in (0, 1, 3, 4):
        assert not out[k].HasField("error") and out[k].results[0].click_id == clicks[k].id
        assert out[k].results[0].found


def test_concurrent_stream_limit(tile):
    img, clicks = tile
    srv = NuClickServer(
        engine_for(DiscModel(), "disc"), port=0, http_port=0, limits=Limits(max_concurrent_streams=1)
    ).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            stub = pb_grpc.NuClickStub(ch)
            feed: queue.Queue = queue.Queue()
            first = stub.SegmentStream(iter(feed.get, None), timeout=60)
            feed.put(request(img, clicks[:1]))
            assert next(first).results[0].found  # the first stream is open and working
            with pytest.raises(grpc.RpcError) as info:
                list(stub.SegmentStream(iter([request(img, clicks[:1])]), timeout=30))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 1" in info.value.details()
            assert _http(srv.http_port, "/v1/segmentStream", _json(request(img, clicks[:1])))[0] == 429
            feed.put(None)
            assert list(first) == []
            for _ in range(100):  # the slot is released when the call ends
                if srv.stats()["active_streams"] == 0:
                    break
                time.sleep(0.02)
            out = list(stub.SegmentStream(iter([request(img, clicks[:1])]), timeout=30))
            assert out[0].results[0].found
    finally:
        srv.stop(grace=1)


# ------------------------------------------------------- token, TLS, health


def test_bearer_token_on_grpc_and_http(tile):
    img, clicks = tile
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=0, token=TOKEN).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            stub = pb_grpc.NuClickStub(ch)
            for metadata, words in (((), "missing"), ((("authorization", "Bearer nope"),), "wrong")):
                for call in (
                    lambda md: stub.Segment(request(img, clicks), timeout=10, metadata=md),
                    lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=md),
                    lambda md: list(stub.SegmentStream(iter([request(img, clicks)]), timeout=10, metadata=md)),
                ):
                    with pytest.raises(grpc.RpcError) as info:
                        call(metadata)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and words in info.value.details()
            good = (("authorization", f"Bearer {TOKEN}"),)
            assert len(stub.Segment(request(img, clicks), timeout=10, metadata=good).results) == len(clicks)
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=good).limits.auth_required
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # open to probes
        body = _json(request(img, clicks))
        assert _http(srv.http_port, "/v1/segment", body)[0] == 401
        assert _http(srv.http_port, "/v1/segment", body, {"Authorization": "Bearer nope"})[0] == 401
        assert _http(srv.http_port, "/v1/model", None, {"Authorization": "Basic abc"})[0] == 401
        assert _http(srv.http_port, "/v1/segment", body, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert _http(srv.http_port, "/healthz")[0] == 200
    finally:
        srv.stop(grace=1)


def test_tls_on_grpc_and_http(tls_pair, tile):
    img, clicks = tile
    cert, key = tls_pair
    srv = NuClickServer(
        engine_for(DiscModel(), "disc"), port=0, http_port=0, tls=(cert.read_bytes(), key.read_bytes())
    ).start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{srv.grpc_port}", creds) as ch:
            resp = pb_grpc.NuClickStub(ch).Segment(request(img, clicks), timeout=30)
            assert [r.click_id for r in resp.results] == [c.id for c in clicks]
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:  # plaintext to a TLS port
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.NuClickStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        ctx = ssl.create_default_context(cafile=str(cert))
        status, body = _http(srv.http_port, "/v1/model", scheme="https", context=ctx)
        assert status == 200 and json.loads(body)["model"]["name"] == "disc"
        with pytest.raises(urllib.error.URLError):
            _http(srv.http_port, "/v1/model", scheme="https", context=ssl.create_default_context())  # untrusted
    finally:
        srv.stop(grace=1)


def test_tls_and_port_mistakes_get_a_hint(tls_pair, tile, tmp_path, capsys, monkeypatch):
    """gRPC's own words ('Socket closed', 'missing selected ALPN property') name
    the symptom; the client's error says what is likely wrong."""
    from bridge.cli import main
    from bridge.client import NuClickClient, ServerError

    img, _ = tile
    cert, key = tls_pair
    secure = NuClickServer(
        engine_for(DiscModel(), "disc"), port=0, http_port=0, tls=(cert.read_bytes(), key.read_bytes())
    ).start()
    plain = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=0).start()
    ca = "set NUCLICK_BRIDGE_CA to the PEM CA bundle of its certificate"
    http_port = "is this the server's HTTP port? --server takes its gRPC port"
    cases = [
        (secure.grpc_port, {}, ca),  # TLS server, no CA bundle: "Socket closed"
        (plain.http_port, {}, http_port),  # the HTTP port: "Failed parsing HTTP/2"
        (secure.http_port, {"root_certificates": cert}, http_port),  # "missing selected ALPN property"
        (plain.grpc_port, {"root_certificates": cert}, "the server does not use TLS on this port"),
        (secure.grpc_port, {"tls": True}, "the server's certificate is not trusted"),  # system CAs only
    ]
    try:
        for port, kw, hint in cases:
            client = NuClickClient(f"127.0.0.1:{port}", retries=0, timeout=10, **kw)
            with client as cl, pytest.raises(ServerError) as info:
                cl.info()
            assert info.value.code == "UNAVAILABLE" and hint in str(info.value), (port, kw, str(info.value))
        with NuClickClient(f"127.0.0.1:{secure.grpc_port}", root_certificates=cert, retries=0) as cl:
            assert cl.info().model_name == "disc"  # the right CA: no error at all

        # As a user meets it: segment --server against the TLS server without NUCLICK_BRIDGE_CA.
        Image.fromarray(img).save(tmp_path / "i.png")
        (tmp_path / "c.csv").write_text("x,y\n10,10\n")
        monkeypatch.delenv("NUCLICK_BRIDGE_CA", raising=False)
        quick = classmethod(lambda cls, target, **kw: cls(target, retries=0, timeout=10, **kw))
        monkeypatch.setattr(NuClickClient, "from_env", quick)
        args = ["segment", str(tmp_path / "i.png"), "--points", str(tmp_path / "c.csv")]
        args += ["--out", str(tmp_path / "o.geojson"), "--server", f"127.0.0.1:{secure.grpc_port}"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nuclick-bridge segment: error: cannot reach") and ca in err[0]
    finally:
        secure.stop(grace=1)
        plain.stop(grace=1)


def test_health_and_reflection(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "nuclick.v1.NuClick"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"nuclick.v1.NuClick", "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("nuclick.v1.NuClick")
        assert desc.name == "nuclick/v1/nuclick.proto" and desc.package == "nuclick.v1"


def test_a_second_server_on_a_taken_port_is_a_clear_error(server):
    from bridge.errors import BridgeInputError

    with pytest.raises(BridgeInputError, match="cannot listen for gRPC"):
        NuClickServer(engine_for(DiscModel(), "disc"), port=server.grpc_port, http_port=None).start()
    with pytest.raises(BridgeInputError, match="cannot listen for HTTP"):
        NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=server.http_port).start()
