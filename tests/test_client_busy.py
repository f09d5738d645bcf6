"""A busy server is asked again, not given up on: RESOURCE_EXHAUSTED with the
server's ``retry-after-ms`` hint (honoured, never sooner), gRPC's own
concurrent-call limit, a stream without a free slot, a tile refused as busy
mid-stream; and the RESOURCE_EXHAUSTED answers that are permanent limits (a
message over the size limit, too many clicks) are raised at once.

The busy servers here are real gRPC servers on 127.0.0.1 serving the NuClick
service: they refuse the first calls, then answer through the real
:class:`~bridge.service.core.SegmentService` of a real
:class:`~bridge.service.server.NuClickServer`."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from bridge.cli import main
from bridge.client import NuClickClient, ServerError, TileJob
from bridge.evaluation.clicks import simulate_clicks
from bridge.io.imageio import ArrayReader
from bridge.results import Click
from bridge.service.core import Limits
from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.gen import nuclick_pb2_grpc as pb_grpc
from bridge.service.server import NuClickServer, NuClickServicer
from support.models import DiscModel, Gate, TextureModel, engine_for

RETRY_AFTER_KEY = "retry-after-ms"  # the wire contract: trailing metadata, whole milliseconds
BUSY = "512 calls wait for a compute slot"  # no busy word in it: only the hint makes it "busy"


@pytest.fixture(scope="module")
def real():
    srv = NuClickServer(engine_for(TextureModel(), "texture"), port=0, http_port=None).start()
    yield srv
    srv.stop(grace=1)


class BusyServicer(NuClickServicer):
    """The NuClick service that refuses its first ``refusals`` unary calls and
    first ``refusals`` streams as busy (with ``hint`` as ``retry-after-ms``
    when given), answers the first tile of the next ``busy_replies`` streams
    with a busy error, then serves as the real service does.  Records when
    each call came and the deadline its client gave it."""

    def __init__(
        self,
        service,
        refusals: int = 0,
        hint: str | None = "200",
        detail: str = BUSY,
        busy_replies: int = 0,
    ) -> None:
        super().__init__(service)
        self.left = {"Segment": refusals, "SegmentStream": refusals}
        self.busy_replies = busy_replies
        self.hint = hint
        self.detail = detail
        self.lock = threading.Lock()
        self.calls: list[tuple[str, float, float | None]] = []  # (method, arrival, seconds left)

    def _maybe_refuse(self, method: str, context) -> None:
        with self.lock:
            self.calls.append((method, time.monotonic(), context.time_remaining()))
            refuse = self.left[method] > 0
            self.left[method] -= int(refuse)
        if refuse:
            if self.hint is not None:
                context.set_trailing_metadata(((RETRY_AFTER_KEY, self.hint),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.detail)

    def Segment(self, request, context):
        self._maybe_refuse("Segment", context)
        return super().Segment(request, context)

    def SegmentStream(self, request_iterator, context):
        self._maybe_refuse("SegmentStream", context)
        with self.lock:
            reply_busy = self.busy_replies > 0
            self.busy_replies -= int(reply_busy)
        if reply_busy:  # as a server whose queue is full answers one tile of a stream
            first = next(iter(request_iterator))
            error = pb.Error(code="RESOURCE_EXHAUSTED", message="the queue is full: retry later")
            yield pb.SegmentResponse(request_id=first.request_id, error=error)
            return
        yield from super().SegmentStream(request_iterator, context)

    def arrivals(self, method: str) -> list[float]:
        return [t for m, t, _ in self.calls if m == method]


@contextlib.contextmanager
def serving(servicer: NuClickServicer, max_rpcs: int | None = None) -> Iterator[str]:
    """``servicer`` (and the health service) on a real gRPC server on
    127.0.0.1; its target."""
    server = grpc.server(ThreadPoolExecutor(max_workers=8), maximum_concurrent_rpcs=max_rpcs)
    pb_grpc.add_NuClickServicer_to_server(servicer, server)
    checks = health.HealthServicer()
    for name in ("", "nuclick.v1.NuClick"):
        checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def same(got, expected) -> None:
    assert [r.click.id for r in got] == [r.click.id for r in expected]
    for g, e in zip(got, expected, strict=True):
        assert (g.found, g.reason) == (e.found, e.reason), g.click.id
        if e.found:
            assert g.polygon.equals_exact(e.polygon, tolerance=1e-6), g.click.id


def test_a_busy_server_is_asked_again_no_sooner_than_its_hint(real, crop_pair):
    img, _ = crop_pair
    clicks = [Click(60.5, 60.5, "a"), Click(30.5, 90.5, "b")]
    with NuClickClient(f"127.0.0.1:{real.grpc_port}") as direct:
        expected = direct.segment(img[:128, :128], clicks)
    busy = BusyServicer(real.service, refusals=3, hint="200")
    with serving(busy) as target, NuClickClient(target) as client:
        got = client.segment(img[:128, :128], clicks)
        assert (client.retry_count, client.busy_retry_count) == (3, 3)
    same(got, expected)
    times = busy.arrivals("Segment")
    assert len(times) == 4
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(times))  # the hint is a floor


def test_a_whole_image_over_a_busy_server_equals_the_in_process_engine(real, monuseg_pair):
    """segment_tiled's parallel calls: every refused tile is sent again, each
    answered once, the answer the engine gives with the whole image."""
    img, lab = monuseg_pair
    img, lab = np.ascontiguousarray(img[:420, :420]), lab[:420, :420]
    xy, _ = simulate_clicks(lab, jitter=3, seed=1)
    clicks = [Click(x, y, f"k{i}") for i, (x, y) in enumerate(xy)]
    expected = engine_for(TextureModel()).segment(ArrayReader(img), clicks).results
    busy = BusyServicer(real.service, refusals=6, hint="20")
    with serving(busy) as target, NuClickClient(target, concurrency=3) as client:
        got = client.segment_tiled(ArrayReader(img), clicks, max_tile=512).results
        assert client.busy_retry_count == 6
    same(got, expected)


def test_a_stream_waits_for_a_slot_and_resends_a_tile_refused_as_busy(real, crop_pair):
    img, _ = crop_pair
    jobs = [
        TileJob(img[:128, :128], [Click(60.5, 60.5, "a"), Click(30.5, 90.5, "b")]),
        TileJob(img[128:, 128:], [Click(200.5, 190.5, "c")], origin=(128, 128)),
    ]
    with NuClickClient(f"127.0.0.1:{real.grpc_port}") as direct:
        expected = list(direct.segment_many(jobs))
    busy = BusyServicer(real.service, refusals=2, hint="50", busy_replies=1)
    with serving(busy) as target, NuClickClient(target) as client:
        got = list(client.segment_many(jobs))
        assert client.busy_retry_count == 3  # two streams refused, one tile answered "busy"
    for g, e in zip(got, expected, strict=True):
        same(g, e)


def test_grpcs_concurrent_call_limit_is_busy_without_a_hint(crop_pair):
    """gRPC's maximum_concurrent_rpcs refuses with no hint: the call backs off
    and goes through once the call ahead of it is done."""
    img, _ = crop_pair
    gate = Gate()
    srv = NuClickServer(engine_for(DiscModel(gate=gate), "gated"), port=0, http_port=None).start()
    try:
        # One call at a time: the call ahead holds it at the gate.
        with serving(NuClickServicer(srv.service), max_rpcs=1) as target, NuClickClient(target) as client:
            ahead = ThreadPoolExecutor(1).submit(client.segment, img[:96, :96], [Click(40.5, 40.5, "ahead")])
            assert gate.entered.wait(30)

            def open_when_refused() -> None:
                while client.busy_retry_count == 0 and not ahead.done():
                    time.sleep(0.01)
                gate.opened.set()

            opener = threading.Thread(target=open_when_refused, daemon=True)
            opener.start()
            got = client.segment(img[:96, :96], [Click(40.5, 40.5, "next")])
            assert got[0].found and ahead.result(30)[0].found
            assert client.busy_retry_count >= 1
    finally:
        gate.opened.set()
        srv.stop(grace=1)


def test_a_real_servers_full_queue_is_waited_out(crop_pair):
    """``serve --workers 1 --queue 0``: while one call computes, the next is
    refused as busy with the server's own retry-after-ms; the client waits
    and gets its answer once the first is done."""
    img, _ = crop_pair
    gate = Gate()
    limits = Limits(max_concurrent_streams=0, max_queued_calls=0)
    engine = engine_for(DiscModel(gate=gate), "gated")
    srv = NuClickServer(engine, port=0, http_port=None, limits=limits, workers=1).start()
    try:
        with NuClickClient(f"127.0.0.1:{srv.grpc_port}") as client:
            ahead = ThreadPoolExecutor(1).submit(client.segment, img[:96, :96], [Click(40.5, 40.5, "ahead")])
            assert gate.entered.wait(30)

            def open_when_refused() -> None:
                while srv.stats().get("refused", 0) == 0 and not ahead.done():
                    time.sleep(0.01)
                gate.opened.set()

            threading.Thread(target=open_when_refused, daemon=True).start()
            got = client.segment(img[:96, :96], [Click(40.5, 40.5, "next")])
            assert got[0].found and ahead.result(30)[0].found
            assert client.busy_retry_count >= 1 and srv.stats()["refused"] >= 1
    finally:
        gate.opened.set()
        srv.stop(grace=1)


def test_a_hint_past_the_deadline_fails_at_once_in_one_line(real, crop_pair):
    img, _ = crop_pair
    busy = BusyServicer(real.service, refusals=5, hint="60000")
    with serving(busy) as target, NuClickClient(target, timeout=5) as client, pytest.raises(ServerError) as info:
        client.segment(img[:96, :96], [Click(40.5, 40.5, "a")])
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert "stayed busy" in str(info.value) and "--timeout" in str(info.value)
    assert len(busy.arrivals("Segment")) == 1


def test_limits_are_permanent_and_not_retried(crop_pair):
    """RESOURCE_EXHAUSTED for a message over the size limit, too many clicks
    or a hinted "message larger than max" is raised at once."""
    img, _ = crop_pair
    limits = Limits(max_message_bytes=64 << 10, max_clicks_per_request=2)
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=None, limits=limits).start()
    try:
        with NuClickClient(f"127.0.0.1:{srv.grpc_port}") as client:
            with pytest.raises(ServerError) as info:
                client.segment(img, [Click(40.5, 40.5, "a")])  # 196 KB of raw pixels
            assert info.value.code == "RESOURCE_EXHAUSTED" and "larger than max" in str(info.value)
            assert "--max-message-mb" in str(info.value)
            three = [Click(40.5, 40.5, "a"), Click(50.5, 50.5, "b"), Click(60.5, 60.5, "c")]
            with pytest.raises(ServerError) as info:
                client.segment(img[:96, :96], three)
            assert info.value.code == "RESOURCE_EXHAUSTED" and "limit is 2" in str(info.value)
            assert client.retry_count == 0
        size = BusyServicer(srv.service, refusals=3, hint="10", detail="Received message larger than max (9 vs. 4)")
        with serving(size) as target, NuClickClient(target) as client:
            with pytest.raises(ServerError, match="larger than max"):
                client.segment(img[:96, :96], [Click(40.5, 40.5, "a")])
            assert client.retry_count == 0 and len(size.arrivals("Segment")) == 1
    finally:
        srv.stop(grace=1)


def test_segment_command_finishes_over_a_busy_server(real, crop_pair, tmp_path, capsys):
    img, lab = crop_pair
    Image.fromarray(img).save(tmp_path / "crop.png")
    xy, _ = simulate_clicks(lab, jitter=0, seed=0)
    (tmp_path / "c.csv").write_text("x,y\n" + "".join(f"{x:.2f},{y:.2f}\n" for x, y in xy[:12]))
    base = ["segment", str(tmp_path / "crop.png"), "--points", str(tmp_path / "c.csv")]
    assert main([*base, "--out", str(tmp_path / "direct.geojson"), "--server", f"127.0.0.1:{real.grpc_port}"]) == 0
    busy = BusyServicer(real.service, refusals=2, hint="30")
    with serving(busy) as target:
        assert main([*base, "--out", str(tmp_path / "busy.geojson"), "--server", target]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["busy_retries"] == 2 == summary["retries"]
    assert "busy server" in err

    def outlines(name: str) -> list:
        return [f["geometry"] for f in json.loads((tmp_path / name).read_text())["features"]]

    assert outlines("busy.geojson") == outlines("direct.geojson") and len(outlines("direct.geojson")) >= 5
