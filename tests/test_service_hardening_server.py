"""What a probing client found against the server, each against a real server
on 127.0.0.1 (or the real SegmentService the HTTP gateway calls): busy calls
wait in a bounded queue and are refused, counted and with a retry hint, only
when it is full; idle streams give their slot back; request ids are bounded;
failed logins are counted and logged; garbage bytes are a clean
INVALID_ARGUMENT; the in-flight gauge and the refusals while draining are
exact.  Waits are bounded; nothing is timed."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import json_format

from bridge.model.network import NuClickNet
from bridge.model.weights import save_weights
from bridge.service.auth import WRONG, record_auth_failure
from bridge.service.convert import ServiceError, tile_to_pb
from bridge.service.core import MAX_REQUEST_ID, Limits, SegmentService
from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.gen import nuclick_pb2_grpc as pb_grpc
from bridge.service.logs import JsonFormatter, Throttle
from bridge.service.server import NuClickServer
from support.models import DiscModel, Gate, engine_for
from support.waiting import wait_until

TOKEN = "hardening-token-7f3a"


def sample(service: SegmentService, name: str, **labels: str) -> float:
    """A value of /metrics (the registry it renders), 0 when the series does not exist yet."""
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def small(crop_pair) -> np.ndarray:
    return np.ascontiguousarray(crop_pair[0][:64, :64])


def start_segment(service, req: pb.SegmentRequest, results: dict, name: str, **kw) -> threading.Thread:
    """``service.segment(req)`` on a thread of its own; its answer, or the ServiceError, lands in ``results[name]``."""

    def run() -> None:
        try:
            results[name] = service.segment(req, **kw)
        except ServiceError as exc:
            results[name] = exc

    t = threading.Thread(target=run)
    t.start()
    return t


def one(img: np.ndarray, rid: str = "r", k: int = 0) -> pb.SegmentRequest:
    req = pb.SegmentRequest(tile=tile_to_pb(img), request_id=rid)
    req.clicks.add(x=30.5 + k % 5, y=30.5, id=f"c{k}")
    return req


def records(caplog, msg: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == msg]


def fields(record: logging.LogRecord) -> dict:
    return getattr(record, "fields", {}) or {}


@pytest.fixture()
def gated():
    """A server whose network waits for the test: calls hold their compute slot until the gate opens."""
    made: list[NuClickServer] = []
    gates: list[Gate] = []

    def make(workers: int, **limits) -> tuple[NuClickServer, Gate]:
        gate = Gate()
        limits.setdefault("max_concurrent_streams", 0)
        srv = NuClickServer(
            engine_for(DiscModel(gate=gate), "disc"), port=0, http_port=None, workers=workers, limits=Limits(**limits)
        ).start()
        made.append(srv)
        gates.append(gate)
        return srv, gate

    yield make
    for gate in gates:
        gate.opened.set()
    for srv in made:
        srv.stop(grace=1)


# ------------------------------------------------------------ busy: wait, then refuse


def test_busy_calls_wait_in_the_queue_and_all_get_their_answer(gated, small):
    """10 calls at once on 2 workers: 2 compute, 8 wait (gRPC's old limit, 4 x workers,
    refused 2 of them at once); every one is answered once the network moves."""
    srv, gate = gated(workers=2)
    service = srv.service
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = pb_grpc.NuClickStub(ch)
        futures = [stub.Segment.future(one(small, f"r{k}", k), timeout=60) for k in range(10)]
        assert wait_until(lambda: sample(service, "nuclick_calls_waiting") == 8), "8 calls should wait for a slot"
        assert sample(service, "nuclick_requests_in_flight") == 10
        gate.opened.set()
        answers = [f.result() for f in futures]
    assert [a.request_id for a in answers] == [f"r{k}" for k in range(10)]
    assert all(a.results[0].found for a in answers)
    assert sample(service, "nuclick_refused_total", reason="queue_full") == 0
    assert sample(service, "nuclick_calls_waiting") == 0 and sample(service, "nuclick_requests_in_flight") == 0


def test_a_full_queue_refuses_at_once_with_a_retry_hint_counted_and_logged(gated, small, caplog):
    caplog.set_level(logging.INFO, logger="bridge.service")
    srv, gate = gated(workers=1, max_queued_calls=1)
    service = srv.service
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = pb_grpc.NuClickStub(ch)
        computing = stub.Segment.future(one(small, "a"), timeout=60)
        assert gate.entered.wait(20)
        waiting = stub.Segment.future(one(small, "b"), timeout=60)
        assert wait_until(lambda: sample(service, "nuclick_calls_waiting") == 1)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as info:
                stub.Segment(one(small, "c"), timeout=20)
            err = info.value
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "busy" in err.details() and "queue is full" in err.details() and "retry after" in err.details()
            hint = dict(err.trailing_metadata() or ())
            assert int(hint["retry-after-ms"]) > 0
        assert sample(service, "nuclick_refused_total", reason="queue_full") == 2
        assert sample(service, "nuclick_requests_total", method="Segment", code="RESOURCE_EXHAUSTED") == 2
        gate.opened.set()
        assert computing.result().results[0].found and waiting.result().results[0].found
    refused = records(caplog, "refused")
    assert 1 <= len(refused) <= 2  # rate-limited: at most one line a second
    assert fields(refused[0])["reason"] == "queue_full" and refused[0].levelno == logging.WARNING
    assert sample(service, "nuclick_requests_in_flight") == 0 and sample(service, "nuclick_calls_waiting") == 0


def test_waiting_ends_on_cancel_and_on_the_deadline_for_the_http_gateway_way(small):
    """The HTTP gateway calls SegmentService.segment from a thread of its own: a call
    waits for a slot, and leaves the queue when its cancel event is set or its
    deadline passes; a gRPC call whose deadline passes while it waits leaves too."""
    gate = Gate()
    service = SegmentService(engine_for(DiscModel(gate=gate), "disc"), Limits(max_queued_calls=4), workers=1)
    results: dict[str, object] = {}

    def call(name: str, **kw) -> threading.Thread:
        return start_segment(service, one(small, name), results, name, **kw)

    try:
        first = call("first")
        assert gate.entered.wait(20)
        cancel = threading.Event()
        cancelled = call("cancelled", cancel=cancel)
        assert wait_until(lambda: service._admission.waiting == 1)
        cancel.set()
        cancelled.join(20)
        assert isinstance(results["cancelled"], ServiceError) and results["cancelled"].code == "CANCELLED"
        assert service._admission.waiting == 0
        late = call("late", deadline=time.monotonic() + 0.2)
        late.join(20)
        assert isinstance(results["late"], ServiceError) and results["late"].code == "DEADLINE_EXCEEDED"
        assert sample(service, "nuclick_calls_waiting") == 0
        gate.opened.set()
        first.join(20)
        assert results["first"].results[0].found
        assert sample(service, "nuclick_requests_in_flight") == 0
        assert service.stats()["cancelled"] == 1
    finally:
        gate.opened.set()
        service.close()


def test_a_grpc_deadline_that_passes_in_the_queue_frees_the_place(gated, small):
    srv, gate = gated(workers=1, max_queued_calls=1)
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = pb_grpc.NuClickStub(ch)
        computing = stub.Segment.future(one(small, "a"), timeout=60)
        assert gate.entered.wait(20)
        with pytest.raises(grpc.RpcError) as info:
            stub.Segment(one(small, "b"), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: sample(srv.service, "nuclick_calls_waiting") == 0)
        queued = stub.Segment.future(one(small, "c"), timeout=60)  # the queue has room again
        assert wait_until(lambda: sample(srv.service, "nuclick_calls_waiting") == 1)
        gate.opened.set()
        assert computing.result().results[0].found and queued.result().results[0].found


# ------------------------------------------------------------------ draining


def test_calls_refused_while_draining_are_counted_once_and_leave_no_call_in_flight(small, caplog):
    caplog.set_level(logging.INFO, logger="bridge.service")
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=None).start()
    service = srv.service
    try:
        assert service.drain(0.0)  # nothing in flight: the server now refuses new calls
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch, pytest.raises(grpc.RpcError) as info:
            pb_grpc.NuClickStub(ch).Segment(one(small), timeout=20)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
        with pytest.raises(ServiceError) as direct:  # the HTTP gateway's way in
            service.segment(one(small))
        assert direct.value.code == "UNAVAILABLE"
        assert sample(service, "nuclick_requests_in_flight") == 0
        assert sample(service, "nuclick_requests_total", method="Segment", code="UNAVAILABLE") == 2
        assert sample(service, "nuclick_refused_total", reason="shutting_down") == 2
        assert service.stats()["refused"] == 2 and service.stats()["active_calls"] == 0
        refused = records(caplog, "refused")
        assert 1 <= len(refused) <= 2 and fields(refused[0])["code"] == "UNAVAILABLE"
        assert not records(caplog, "segment"), "a refused call is not also logged as answered"
    finally:
        srv.stop(grace=1)


def test_calls_still_waiting_when_the_grace_runs_out_are_refused_unavailable(small):
    gate = Gate()
    service = SegmentService(engine_for(DiscModel(gate=gate), "disc"), Limits(max_queued_calls=4), workers=1)
    out: dict[str, object] = {}

    def call(name: str) -> threading.Thread:
        return start_segment(service, one(small, name), out, name)

    try:
        first = call("first")
        assert gate.entered.wait(20)
        queued = call("queued")
        assert wait_until(lambda: service._admission.waiting == 1)
        assert not service.drain(0.1)  # the first call holds the network: the grace runs out
        queued.join(20)
        assert isinstance(out["queued"], ServiceError) and out["queued"].code == "UNAVAILABLE"
        assert sample(service, "nuclick_refused_total", reason="shutting_down") == 1
        gate.opened.set()
        first.join(20)
        assert out["first"].results[0].found  # a call that had started is finished
        assert sample(service, "nuclick_requests_in_flight") == 0
    finally:
        gate.opened.set()
        service.close()


# --------------------------------------------------------------- idle streams


def test_an_idle_stream_is_ended_and_gives_its_slot_back(small, caplog):
    caplog.set_level(logging.INFO, logger="bridge.service")
    srv = NuClickServer(
        engine_for(DiscModel(), "disc"),
        port=0,
        http_port=None,
        limits=Limits(max_concurrent_streams=1, stream_idle_timeout_s=0.5),
    ).start()
    feed: queue.Queue = queue.Queue()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            stub = pb_grpc.NuClickStub(ch)
            call = stub.SegmentStream(iter(feed.get, None))  # no deadline: only the server can end it
            got: list = []

            def consume() -> None:
                try:
                    got.extend(call)
                except grpc.RpcError as exc:
                    got.append(exc)

            reader = threading.Thread(target=consume)
            reader.start()
            reader.join(20)
            if reader.is_alive():
                call.cancel()
                reader.join(5)
                pytest.fail("an idle stream held its slot for 20 s")
            assert len(got) == 1 and isinstance(got[0], grpc.RpcError)
            assert got[0].code() == grpc.StatusCode.DEADLINE_EXCEEDED and "sent no request" in got[0].details()
            assert wait_until(lambda: srv.stats()["active_streams"] == 0)
            out = list(stub.SegmentStream(iter([one(small, "after")]), timeout=30))  # the slot is free
            assert out[0].request_id == "after" and out[0].results[0].found
        assert sample(srv.service, "nuclick_stream_idle_timeouts_total") == 1
        idle = records(caplog, "stream idle timeout")
        assert len(idle) == 1 and fields(idle[0])["peer"]
    finally:
        feed.put(None)
        srv.stop(grace=1)


def test_a_stream_waiting_for_its_answer_is_not_idle(small):
    gate = Gate()
    srv = NuClickServer(
        engine_for(DiscModel(gate=gate), "disc"),
        port=0,
        http_port=None,
        limits=Limits(max_concurrent_streams=1, stream_idle_timeout_s=0.3),
    ).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            call = pb_grpc.NuClickStub(ch).SegmentStream(iter([one(small, "slow")]), timeout=60)
            assert gate.entered.wait(20)
            time.sleep(1.0)  # longer than the idle timeout, with the answer outstanding
            gate.opened.set()
            out = list(call)
        assert [o.request_id for o in out] == ["slow"] and out[0].results[0].found
        assert sample(srv.service, "nuclick_stream_idle_timeouts_total") == 0
    finally:
        gate.opened.set()
        srv.stop(grace=1)


# ------------------------------------------------------------------ request id


def test_request_id_is_bounded_and_never_floods_the_log(small, caplog):
    caplog.set_level(logging.INFO, logger="bridge.service")
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=0).start()
    huge = "x" * (1 << 20)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            stub = pb_grpc.NuClickStub(ch)
            assert stub.Segment(one(small, "i" * MAX_REQUEST_ID), timeout=30).results[0].found
            for rid in ("i" * (MAX_REQUEST_ID + 1), huge):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Segment(one(small, rid), timeout=30)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert f"the limit is {MAX_REQUEST_ID}" in info.value.details()
                assert len(info.value.details()) < 300
            out = list(stub.SegmentStream(iter([one(small, huge), one(small, "ok")]), timeout=30))
            assert out[0].error.code == "INVALID_ARGUMENT" and out[0].request_id == ""  # not echoed back
            assert out[1].request_id == "ok" and out[1].results[0].found
        body = json_format.MessageToJson(one(small, huge)).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/v1/segment", data=body)
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(req, timeout=30)
        assert http_err.value.code == 400
        assert f"the limit is {MAX_REQUEST_ID}" in json.loads(http_err.value.read())["message"]
        with pytest.raises(ServiceError, match="request_id"):
            srv.service.segment(one(small, huge))
    finally:
        srv.stop(grace=1)
    assert records(caplog, "segment")
    formatter = JsonFormatter()
    longest = max(len(formatter.format(r)) for r in caplog.records)
    assert longest < 2000, f"a log line of {longest} characters"


# ------------------------------------------------------------ failed logins


def test_failed_logins_are_counted_and_logged_with_the_peer_never_the_token(small, caplog):
    caplog.set_level(logging.INFO, logger="bridge.service")
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=None, token=TOKEN).start()
    guess = "guess-" + TOKEN[::-1]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            stub = pb_grpc.NuClickStub(ch)
            for metadata in [(("authorization", f"Bearer {guess}"),)] * 3 + [()] * 2:
                with pytest.raises(grpc.RpcError) as info:
                    stub.Segment(one(small), timeout=10, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", f"Bearer {TOKEN}"),)
            assert stub.Segment(one(small), timeout=10, metadata=good).results[0].found
        service = srv.service
        assert sample(service, "nuclick_auth_failures_total", port="grpc", reason="wrong") == 3
        assert sample(service, "nuclick_auth_failures_total", port="grpc", reason="missing") == 2
        # What the HTTP gateway calls for its own refusals:
        record_auth_failure(service.metrics, "203.0.113.9:40000", WRONG, "http", "/v1/segment")
        assert sample(service, "nuclick_auth_failures_total", port="http", reason="wrong") == 1
    finally:
        srv.stop(grace=1)
    failed = records(caplog, "auth failed")
    assert 1 <= len(failed) <= 6  # at most one line a second per port
    first = fields(failed[0])
    assert first["port"] == "grpc" and "127.0.0.1" in first["peer"] and first["reason"] in ("wrong", "missing")
    assert first["method"] == "/nuclick.v1.NuClick/Segment" and failed[0].levelno == logging.WARNING
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert guess not in text and TOKEN not in text


def test_throttle_writes_one_line_per_interval_and_counts_the_rest(caplog):
    caplog.set_level(logging.INFO, logger="bridge.test")
    now = [100.0]
    throttle = Throttle(1.0, clock=lambda: now[0])
    logger = logging.getLogger("bridge.test")
    written = [throttle.log(logger, "k", "event", logging.INFO, n=k) for k in range(5)]
    assert written == [True, False, False, False, False]
    assert throttle.log(logger, "other", "event", logging.INFO)  # another key has its own budget
    now[0] += 1.5
    assert throttle.log(logger, "k", "event", logging.INFO, n=5)
    lines = [fields(r) for r in records(caplog, "event")]
    assert lines == [{"n": 0}, {}, {"n": 5, "suppressed": 4}]


# ------------------------------------------------------------- garbage bytes


def test_bytes_that_are_no_protobuf_message_are_invalid_argument_without_a_traceback(small, caplog):
    caplog.set_level(logging.INFO)
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=None).start()
    garbage = b"\xff\xff\xff garbage"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
            for method, answer in (("Segment", pb.SegmentResponse), ("GetModelInfo", pb.GetModelInfoResponse)):
                raw = ch.unary_unary(
                    f"/nuclick.v1.NuClick/{method}",
                    request_serializer=lambda b: b,
                    response_deserializer=answer.FromString,
                )
                with pytest.raises(grpc.RpcError) as info:
                    raw(garbage, timeout=20)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
                assert "protobuf message" in info.value.details()
            stream = ch.stream_stream(
                "/nuclick.v1.NuClick/SegmentStream",
                request_serializer=lambda b: b,
                response_deserializer=pb.SegmentResponse.FromString,
            )
            out = list(stream(iter([garbage, one(small, "good").SerializeToString()]), timeout=30))
            assert out[0].error.code == "INVALID_ARGUMENT" and "protobuf message" in out[0].error.message
            assert out[1].request_id == "good" and out[1].results[0].found
            assert pb_grpc.NuClickStub(ch).Segment(one(small), timeout=30).results[0].found
        assert sample(srv.service, "nuclick_requests_total", method="Segment", code="INVALID_ARGUMENT") == 1
    finally:
        srv.stop(grace=1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], [
        r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
    ]


# ------------------------------------------------------------------ serve flags


def test_serve_flags_set_the_queue_and_the_stream_idle_timeout(tmp_path, capsys):
    from bridge.cli import build_parser, main
    from bridge.commands.serve import build_server

    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    save_weights(weights, NuClickNet(0.125), {"name": "tiny", "version": "t1", "pixel_size_um": 0.25})
    base = ["serve", "--weights", str(weights), "--device", "cpu", "--port", "0", "--http-port", "0"]
    server = build_server(build_parser().parse_args([*base, "--queue", "7", "--stream-idle-timeout", "5"]))
    assert server.limits.max_queued_calls == 7 and server.limits.stream_idle_timeout_s == 5.0
    assert server.handler_threads > server.workers + 7
    defaults = build_server(build_parser().parse_args(base))
    assert defaults.limits.max_queued_calls == 512 and defaults.limits.stream_idle_timeout_s == 60.0
    for flag, value, words in (
        ("--queue", "-1", "queue must be >= 0"),
        ("--stream-idle-timeout", "-2", "stream-idle-timeout must be >= 0"),
    ):
        assert main([*base, flag, value]) == 2
        assert words in capsys.readouterr().err
