"""Load and faults against real servers on 127.0.0.1: many concurrent
clients, batches shared between them, cancelled streams, expired deadlines,
a restart under a retrying client, graceful shutdown.  Bounded in time; no
timing is asserted (figures live in benchmarks/)."""

from __future__ import annotations

import queue
import random
import threading
import time
from functools import partial

import grpc
import numpy as np
import pytest
from shapely.geometry import Point, box

from bridge.client import NuClickClient, ServerError
from bridge.results import Click
from bridge.service.batching import Batcher, Cancelled
from bridge.service.convert import tile_to_pb
from bridge.service.core import Limits
from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.gen import nuclick_pb2_grpc as pb_grpc
from bridge.service.server import NuClickServer
from support.models import DiscModel, Gate, engine_for
from support.waiting import wait_until as support_wait_until

wait_until = partial(support_wait_until, timeout=15.0)


def idle(server: NuClickServer) -> bool:
    s = server.stats()
    return s["active_calls"] == 0 and s["active_streams"] == 0 and s["batch_queued_chunks"] == 0


@pytest.fixture()
def slow_server():
    """0.25 s per network batch of at most 2 patches: long enough to cancel."""
    srv = NuClickServer(
        engine_for(DiscModel(delay_s=0.25), "slow"), port=0, http_port=0, limits=Limits(max_batch=2)
    ).start()
    yield srv
    srv.stop(grace=1)


def one_click(img: np.ndarray, k: int = 0) -> tuple[np.ndarray, list[Click]]:
    return img[:96, :96], [Click(40.5 + k, 50.5, f"c{k}")]


def test_16_clients_x_20_requests_each_get_their_own_answers(crop_pair):
    img, _ = crop_pair
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=None).start()
    errors: list[BaseException] = []
    answered = [0] * 16

    def client(n: int) -> None:
        rng = random.Random(n)
        try:
            with NuClickClient(f"127.0.0.1:{srv.grpc_port}", timeout=60) as cl:
                for r in range(20):
                    x0, y0 = rng.randrange(0, 160), rng.randrange(0, 160)
                    tile = img[y0 : y0 + 96, x0 : x0 + 96]
                    origin = (10_000.0 * n + x0, 7.0 * r + y0)  # every client in its own region
                    clicks = [
                        Click(origin[0] + rng.uniform(20, 76), origin[1] + rng.uniform(20, 76), f"c{n}-r{r}-k{k}")
                        for k in range(rng.randint(1, 3))
                    ]
                    results = cl.segment(tile, clicks, origin=origin)
                    assert [x.click.id for x in results] == [c.id for c in clicks]
                    bounds = box(origin[0], origin[1], origin[0] + 96, origin[1] + 96).buffer(1e-9)
                    for res, c in zip(results, clicks, strict=True):
                        assert res.found, res.reason
                        assert bounds.contains(res.polygon)
                        # the disc around this client's own click, not anybody else's
                        assert res.polygon.centroid.distance(Point(c.x, c.y)) < 3.0
                    answered[n] += 1
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        assert answered == [20] * 16
        stats = srv.stats()
        assert stats["requests"] == 320 and stats["errors"] == 0 and idle(srv)
    finally:
        srv.stop(grace=1)


def test_concurrent_requests_are_coalesced_into_one_batch(crop_pair):
    """Four one-click requests that wait while the device is busy meet in one
    forward pass.  The test holds the device (a forward pass waiting at a
    Gate) until all four are queued, so no clock decides what is batched."""
    img, _ = crop_pair
    gate = Gate()
    srv = NuClickServer(
        engine_for(DiscModel(gate=gate), "disc"), port=0, http_port=None, limits=Limits(max_batch=4, batch_wait_ms=0)
    ).start()
    try:
        out: list = [None] * 5

        def call(k: int) -> None:
            with NuClickClient(f"127.0.0.1:{srv.grpc_port}", timeout=60) as cl:
                out[k] = cl.segment(*one_click(img, k))

        busy = threading.Thread(target=call, args=(4,))  # its forward pass holds the device
        busy.start()
        assert gate.entered.wait(30)
        threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        assert wait_until(lambda: srv.stats()["batch_queued_chunks"] == 4), srv.stats()
        gate.opened.set()
        for t in [busy, *threads]:
            t.join(60)
        assert all(o is not None and o[0].found for o in out)
        assert [o[0].click.id for o in out] == [f"c{k}" for k in range(5)]
        stats = srv.stats()
        # the busy call's batch of 1, then the four queued calls in one batch of 4
        assert (stats["batch_batches"], stats["batch_patches"], stats["batch_largest_batch"]) == (2, 5, 4)
    finally:
        gate.opened.set()
        srv.stop(grace=1)


def test_a_stream_cancelled_midway_frees_its_work(slow_server, crop_pair):
    img, _ = crop_pair
    tile, clicks = one_click(img)
    feed: queue.Queue = queue.Queue()
    with grpc.insecure_channel(f"127.0.0.1:{slow_server.grpc_port}") as ch:
        stub = pb_grpc.NuClickStub(ch)
        call = stub.SegmentStream(iter(feed.get, None), timeout=60)
        for k in range(12):
            req = pb.SegmentRequest(tile=tile_to_pb(tile), request_id=str(k))
            req.clicks.add(x=clicks[0].x, y=clicks[0].y, id="c")
            feed.put(req)
        first = next(call)
        assert first.request_id == "0" and first.results[0].found
        call.cancel()
        assert wait_until(lambda: idle(slow_server)), slow_server.stats()
        stats = slow_server.stats()
        assert stats["batch_patches"] < 12  # the rest of the stream was dropped, not computed
        resp = stub.Segment(req, timeout=30)  # and the server is healthy
        assert resp.results[0].found


def test_an_expired_deadline_frees_the_work(slow_server, crop_pair):
    img, _ = crop_pair
    tile = img[:128, :128]
    clicks = [Click(20.5 + 10 * k, 64.5, f"c{k}") for k in range(10)]  # 5 batches, ~1.25 s
    with NuClickClient(f"127.0.0.1:{slow_server.grpc_port}", retries=0) as cl:
        with pytest.raises(ServerError) as info:
            cl.segment(tile, clicks, timeout=0.4)
        assert info.value.code == "DEADLINE_EXCEEDED"
        assert wait_until(lambda: idle(slow_server)), slow_server.stats()
        stats = slow_server.stats()
        assert stats["cancelled"] == 1 and stats["batch_patches"] < 10
        assert all(r.found for r in cl.segment(tile, clicks[:2], timeout=30))


def test_the_client_retries_until_a_restarted_server_is_back(crop_pair):
    img, _ = crop_pair
    first = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=None).start()
    port = first.grpc_port
    second: list[NuClickServer] = []
    try:
        with NuClickClient(f"127.0.0.1:{port}", timeout=30, retries=8) as cl:
            assert cl.segment(*one_click(img))[0].found
            first.stop(grace=0)

            def restart() -> None:
                time.sleep(0.8)
                second.append(NuClickServer(engine_for(DiscModel(), "disc"), port=port, http_port=None).start())

            t = threading.Thread(target=restart)
            t.start()
            results = cl.segment(*one_click(img))  # sent while nothing listens on the port
            t.join(30)
            assert results[0].found and results[0].click.id == "c0"
            assert cl.retry_count >= 1
            assert second and second[0].stats()["requests"] == 1
    finally:
        first.stop(grace=0)
        for s in second:
            s.stop(grace=0)


def test_graceful_stop_finishes_calls_in_flight_and_refuses_new_ones(slow_server, crop_pair):
    img, _ = crop_pair
    tile = img[:128, :128]
    clicks = [Click(20.5 + 10 * k, 64.5, f"c{k}") for k in range(6)]  # 3 batches, ~0.75 s
    target = f"127.0.0.1:{slow_server.grpc_port}"
    result: dict = {}

    def long_call() -> None:
        with NuClickClient(target, retries=0) as cl:
            result["ok"] = cl.segment(tile, clicks, timeout=60)

    caller = threading.Thread(target=long_call)
    caller.start()
    assert wait_until(lambda: slow_server.stats()["active_calls"] == 1)
    stopper = threading.Thread(target=slow_server.stop, kwargs={"grace": 20})
    stopper.start()
    assert wait_until(lambda: slow_server._http.refusing)  # stop has begun
    with NuClickClient(target, retries=0) as cl, pytest.raises(ServerError) as info:
        cl.segment(*one_click(img), timeout=10)
    assert info.value.code == "UNAVAILABLE"
    caller.join(30)
    stopper.join(30)
    assert [r.click.id for r in result["ok"]] == [c.id for c in clicks]
    assert all(r.found for r in result["ok"])
    assert slow_server.wait(0)


def test_the_batcher_hands_every_caller_its_own_rows_and_survives_a_failing_batch():
    sizes: list[int] = []

    def predict(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        if (x == -1).any():
            raise RuntimeError("device error")
        return x * 2.0

    batcher = Batcher(predict, max_batch=6, max_wait_s=0.01)
    errors: list[BaseException] = []

    def caller(n: int) -> None:
        rng = random.Random(n)
        try:
            for r in range(15):
                rows = rng.choice([1, 2, 3, 5, 7])  # 7 > max_batch: runs alone
                x = np.full((rows, 3), 1000.0 * n + r)
                np.testing.assert_array_equal(batcher.run(x), x * 2.0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert sum(sizes) == batcher.stats()["patches"] and all(s <= 6 or s == 7 for s in sizes)
    with pytest.raises(RuntimeError, match="device error"):
        batcher.run(np.full((2, 3), -1.0))
    np.testing.assert_array_equal(batcher.run(np.ones((2, 3))), np.full((2, 3), 2.0))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        batcher.run(np.ones((1, 3)), cancel)
    batcher.stop()


def test_stop_does_not_hang_on_a_health_watch_stuck_mid_send():
    """grpc_health's Watch sends its first answer while holding the servicer's
    lock, which enter_graceful_shutdown also takes; a watcher stuck there (seen
    once under load) must not hang the server's stop: the wait is bounded and
    stopping gRPC goes on."""
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=None).start()
    held, release = threading.Event(), threading.Event()

    def stuck_watch() -> None:  # what the stuck Watch stream does: hold the lock
        with srv._health._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=stuck_watch, daemon=True)
    holder.start()
    assert held.wait(5)
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 1})
    stopper.start()
    stopper.join(15)
    stopped = not stopper.is_alive()
    release.set()
    assert stopped, "stop() hung behind the health servicer's lock"
    assert srv.wait(0)
