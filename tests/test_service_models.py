"""Several named models in one server: requests choose one by name, GetModelInfo
lists them, ``--models-dir`` is read again on SIGHUP without failing or
changing a request in flight, and a file that cannot be loaded leaves the
served set as it was.  Real weights files (small NuClick networks saved with
``save_weights``, each with its own seed and threshold so that their answers
differ), real engines and real servers on 127.0.0.1: in this process, and as
``nuclick-bridge serve`` child processes for the signal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import json_format
from shapely import affinity

from bridge.cli import build_parser, main
from bridge.client import NuClickClient, ServerError
from bridge.commands.serve import build_server, parse_weights
from bridge.errors import BridgeInputError
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
from support.serve import ServeProcess

ORIGIN = (5000.0, 7000.0)
# fp32 on torch, one patch per forward pass: a patch's probabilities do not depend on
# which other requests' patches share its batch, so every answer can be compared exactly.
ENGINE = {"device": "cpu", "precision": "fp32", "backend": "torch", "batch_size": 1}
SERVE_FLAGS = ("--precision", "fp32", "--backend", "torch", "--max-batch", "1")

# name -> (seed, threshold, the file's own name, version); 64 px patches keep the CPU time small.
FILES = {
    "d": (0, 0.5, "tiny-d", "d1"),
    "a1": (2, 0.3, "tiny-a", "a1"),
    "a2": (3, 0.3, "tiny-a", "a2"),
    "b": (4, 0.3, "tiny-b", "b1"),
    "c": (1, 0.3, "tiny-c", "c1"),
}
PATCH = 64


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    out = {}
    for key, (seed, threshold, name, version) in FILES.items():
        torch.manual_seed(seed)
        out[key] = folder / f"{key}.pt"
        meta = {"name": name, "version": version, "threshold": threshold, "patch_size": PATCH}
        save_weights(out[key], NuClickNet(0.125), meta)
    return out


@pytest.fixture(scope="module")
def tile(crop_pair) -> tuple[np.ndarray, list[Click]]:
    """A real 160x128 tile and one click per labelled nucleus, in level 0."""
    img, lab = crop_pair
    xy, _ = simulate_clicks(lab[:128, :160], jitter=0, seed=0)
    clicks = [Click(ORIGIN[0] + float(x), ORIGIN[1] + float(y), f"n{k}") for k, (x, y) in enumerate(xy)]
    assert len(clicks) >= 10
    return np.ascontiguousarray(img[:128, :160]), clicks


@pytest.fixture(scope="module")
def expected(weights, tile) -> dict[str, list]:
    """Each file's whole-tile answer from the in-process engine, keyed by "name version"."""
    img, clicks = tile
    local = [Click(c.x - ORIGIN[0], c.y - ORIGIN[1], c.id) for c in clicks]
    out = {}
    for path in weights.values():
        engine = NuClickEngine.load(path, **ENGINE)
        out[f"{engine.info.name} {engine.info.version}"] = engine.segment(ArrayReader(img), local).results
    return out


def test_the_test_files_answer_measurably_differently(expected):
    """What the rest relies on: a wrong model would give a different answer."""
    found = {label: sum(r.found for r in results) for label, results in expected.items()}
    assert all(n >= 5 for n in found.values()), found
    areas = {label: tuple(round(r.polygon.area) if r.found else 0 for r in rs) for label, rs in expected.items()}
    assert len(set(areas.values())) == len(areas), "two test files give the same answer"


def request(tile, model: str = "", request_id: str = "r") -> pb.SegmentRequest:
    img, clicks = tile
    req = pb.SegmentRequest(tile=tile_to_pb(img, ORIGIN), request_id=request_id, model_name=model)
    for c in clicks:
        req.clicks.add(x=c.x, y=c.y, id=c.id)
    return req


def assert_answer(resp: pb.SegmentResponse, results) -> None:
    """The server's answer is the in-process engine's, shifted to level 0."""
    assert len(resp.results) == len(results)
    for got, exp in zip(resp.results, results, strict=True):
        assert got.found == exp.found, (resp.model, got.click_id, got.reason, exp.reason)
        if exp.found:
            poly = polygon_from_pb(got.polygon)
            shifted = affinity.translate(exp.polygon, *ORIGIN)
            assert poly.equals_exact(shifted, tolerance=1e-6), (resp.model, got.click_id)
            assert got.score == pytest.approx(exp.score, abs=1e-5)


def _http(port: int, path: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def load_engine(path: Path) -> NuClickEngine:
    return NuClickEngine.load(path, **ENGINE)


@pytest.fixture(scope="module")
def two_models(weights):
    """An in-process server: "default" = d, "b" = b, and a models folder holding a1 as "a"."""
    folder = weights["d"].parent / "two_models"
    folder.mkdir()
    shutil.copy(weights["a1"], folder / "a.pt")
    engines = {"default": load_engine(weights["d"]), "b": load_engine(weights["b"])}
    srv = NuClickServer(
        engines, port=0, http_port=0, limits=Limits(max_batch=1), models_dir=folder, load=load_engine
    ).start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def stub(two_models):
    channel = grpc.insecure_channel(f"127.0.0.1:{two_models.grpc_port}")
    yield pb_grpc.NuClickStub(channel)
    channel.close()


# ------------------------------------------------------------ choosing a model


def test_each_request_gets_the_answer_of_the_model_it_names(stub, tile, expected):
    for name, label in [("", "tiny-d d1"), ("default", "tiny-d d1"), ("b", "tiny-b b1"), ("a", "tiny-a a1")]:
        resp = stub.Segment(request(tile, name), timeout=120)
        assert (resp.model_name, resp.model) == (name or "default", label)
        assert_answer(resp, expected[label])


def test_http_json_takes_the_model_name_in_the_proto3_json_mapping(two_models, tile, expected):
    body = json_format.MessageToJson(request(tile, "b"))
    assert '"modelName": "b"' in body
    status, doc = _http(two_models.http_port, "/v1/segment", body.encode())
    assert status == 200 and doc["modelName"] == "b" and doc["model"] == "tiny-b b1"
    assert_answer(json_format.ParseDict(doc, pb.SegmentResponse()), expected["tiny-b b1"])
    status, doc = _http(two_models.http_port, "/v1/segment", json_format.MessageToJson(request(tile)).encode())
    assert status == 200 and (doc["modelName"], doc["model"]) == ("default", "tiny-d d1")


def test_an_unknown_model_is_invalid_argument_naming_the_models(stub, two_models, tile):
    with pytest.raises(grpc.RpcError) as info:
        stub.Segment(request(tile, "lung"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "this server has no model named 'lung'; its models are: default, a, b"
    status, doc = _http(two_models.http_port, "/v1/segment", json_format.MessageToJson(request(tile, "lung")).encode())
    assert status == 400 and doc == {"code": "INVALID_ARGUMENT", "message": info.value.details()}
    # In a stream, the request that names it gets the error and the others their own model's answer.
    out = list(stub.SegmentStream(iter([request(tile, "b", "1"), request(tile, "lung", "2"), request(tile, "", "3")])))
    assert [(r.request_id, r.model_name, r.error.code) for r in out] == [
        ("1", "b", ""),
        ("2", "", "INVALID_ARGUMENT"),
        ("3", "default", ""),
    ]


def test_model_info_lists_every_model_and_keeps_the_default_in_model(stub, two_models, weights):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert (info.model.name, info.model.version) == ("tiny-d", "d1")  # what a client of one model reads
    listed = [(m.name, m.model.name, m.model.version, m.model.sha256) for m in info.models]
    assert listed == [
        ("default", "tiny-d", "d1", load_model(weights["d"])[1].sha256),
        ("a", "tiny-a", "a1", load_model(weights["a1"])[1].sha256),
        ("b", "tiny-b", "b1", load_model(weights["b"])[1].sha256),
    ]
    assert [m.model.threshold for m in info.models] == pytest.approx([0.5, 0.3, 0.3])
    assert all(m.model.arch == "nuclick-w0.125" and m.model.patch_size == PATCH for m in info.models)
    status, doc = _http(two_models.http_port, "/v1/model")
    assert status == 200 and doc["model"]["name"] == "tiny-d"
    assert [(m["name"], m["model"]["version"]) for m in doc["models"]] == [("default", "d1"), ("a", "a1"), ("b", "b1")]


def test_metrics_count_requests_per_model(two_models, stub, tile):
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict:
        text = two_models.service.metrics.render().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    before = samples()
    stub.Segment(request(tile, "b"), timeout=120)
    after = samples()
    key = ("nuclick_model_requests_total", (("code", "OK"), ("name", "b")))
    assert after[key] - before.get(key, 0) == 1
    assert after[("nuclick_served_model_info", (("model", "tiny-a"), ("name", "a"), ("version", "a1")))] == 1
    # The existing series keep their names and labels: the default model's info.
    assert after[("nuclick_model_info", (("device", "cpu"), ("model", "tiny-d"), ("version", "d1")))] == 1


def test_the_python_client_plans_and_segments_with_the_model_it_names(two_models, tile, expected):
    target = f"127.0.0.1:{two_models.grpc_port}"
    img, clicks = tile
    local = [Click(c.x - ORIGIN[0], c.y - ORIGIN[1], c.id) for c in clicks]
    with NuClickClient(target, model="b", timeout=120) as client:
        info = client.info()
        assert (info.served_name, info.model_name, info.model_version) == ("b", "tiny-b", "b1")
        assert [m.name for m in info.models] == ["default", "a", "b"]
        got = client.segment_tiled(ArrayReader(img), local).results
    for g, e in zip(got, expected["tiny-b b1"], strict=True):
        assert g.found == e.found
        if e.found:
            assert g.polygon.equals_exact(e.polygon, tolerance=1e-6)
    with NuClickClient(target, model="lung", timeout=30) as client, pytest.raises(ServerError) as err:
        client.segment_tiled(ArrayReader(img), local)
    assert err.value.code == "INVALID_ARGUMENT"
    assert str(err.value) == f"NuClick server {target} has no model named 'lung'; its models are: default, a, b"


# ------------------------------------------------------------ reloading the folder


def test_a_request_in_flight_keeps_its_model_across_a_reload(tmp_path, weights, tile, expected):
    """Deterministic: the request is held inside the old model's forward pass
    while the folder is read again; it finishes with the old model, new
    requests get the new one, and the old model is dropped once it is done."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(weights["a1"], folder / "a.pt")
    inside, release = threading.Event(), threading.Event()

    def load(path: Path) -> NuClickEngine:
        engine = load_engine(path)
        if engine.info.version == "a1":  # hold a1's forward passes until the test lets them go
            forward = engine.predict

            def held(batch):
                inside.set()
                assert release.wait(60), "the test never released the forward pass"
                return forward(batch)

            engine.predict = held
        return engine

    srv = NuClickServer(
        load_engine(weights["d"]), port=0, http_port=None, limits=Limits(max_batch=1), models_dir=folder, load=load
    ).start()
    answers: list = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
            stub = pb_grpc.NuClickStub(channel)
            first = threading.Thread(target=lambda: answers.append(stub.Segment(request(tile, "a"), timeout=120)))
            first.start()
            assert inside.wait(60)
            old = srv.service.models.current()["a"]
            (folder / "a.pt").unlink()
            shutil.copy(weights["a2"], folder / "a.pt")
            shutil.copy(weights["c"], folder / "c.pt")
            result = srv.reload_models()
            assert (result.ok, result.added, result.reloaded, result.removed) == (True, ["c"], ["a"], [])
            listed = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).models
            assert [(m.name, m.model.version) for m in listed] == [("default", "d1"), ("a", "a2"), ("c", "c1")]
            resp = stub.Segment(request(tile, "a"), timeout=120)
            assert resp.model == "tiny-a a2"
            assert_answer(resp, expected["tiny-a a2"])
            assert_answer(stub.Segment(request(tile, "c"), timeout=120), expected["tiny-c c1"])
            assert old.retired and old.batcher.running, "the old model is kept while its request runs"
            assert not answers
            release.set()
            first.join(120)
            assert len(answers) == 1
            assert (answers[0].model_name, answers[0].model) == ("a", "tiny-a a1")
            assert_answer(answers[0], expected["tiny-a a1"])
            assert not old.batcher.running, "the old model is dropped once no request uses it"
            stats = srv.stats()
            assert stats["batch_patches"] == 3 * len(tile[1])  # every patch of every request, the dropped model's too
    finally:
        release.set()
        srv.stop(grace=1)


def test_a_bad_file_or_a_name_clash_keeps_the_previous_set(tmp_path, weights):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(weights["a1"], folder / "a.pt")
    srv = NuClickServer(
        {"default": load_engine(weights["d"]), "b": load_engine(weights["b"])},
        port=0,
        http_port=None,
        models_dir=folder,
        load=load_engine,
    ).start()
    try:
        before = dict(srv.service.models.current())
        (folder / "bad.pt").write_bytes(b"not a weights file")
        shutil.copy(weights["c"], folder / "c.pt")
        result = srv.reload_models()
        assert not result.ok
        assert f"cannot load {folder / 'bad.pt'}: bad.pt is not a nuclick-bridge weights" in result.error
        assert dict(srv.service.models.current()) == before
        (folder / "bad.pt").unlink()
        shutil.copy(weights["c"], folder / "b.pt")  # "b" is already served from --weights b=FILE
        result = srv.reload_models()
        assert not result.ok and "b.pt" in result.error and "rename the file" in result.error
        assert dict(srv.service.models.current()) == before
        (folder / "b.pt").unlink()
        (folder / "a.pt").unlink()
        result = srv.reload_models()
        assert (result.ok, result.added, result.removed) == (True, ["c"], ["a"])
        assert srv.service.models.names() == ["default", "b", "c"]
        assert not before["a"].batcher.running
    finally:
        srv.stop(grace=1)


# ------------------------------------------------------------ the serve command


def test_weights_flags_name_the_models(weights, tmp_path):
    assert parse_weights(None) == (None, {})
    assert parse_weights(["x.pt"]) == ("x.pt", {})
    assert parse_weights(["default=x.pt", "lung=y.pt"]) == ("x.pt", {"lung": "y.pt"})
    assert parse_weights(["runs/a=b.pt"]) == ("runs/a=b.pt", {}), "a path with '=' in a file name is a plain FILE"
    with pytest.raises(BridgeInputError, match="gives the default model twice"):
        parse_weights(["default=x.pt", "runs/a=b.pt"])
    assert parse_weights(["lung=y.pt", "x.pt"]) == ("x.pt", {"lung": "y.pt"})
    with pytest.raises(BridgeInputError, match="names two models 'lung'"):
        parse_weights(["lung=y.pt", "lung=z.pt"])
    with pytest.raises(BridgeInputError, match="'my lung' is not a valid model name"):
        parse_weights(["my lung=y.pt"])
    with pytest.raises(BridgeInputError, match="names no file"):
        parse_weights(["lung="])
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(weights["a1"], folder / "a.pt")
    args = build_parser().parse_args(
        [
            *("serve", "--port", "0", "--http-port", "0", "--device", "cpu"),
            *("--weights", f"b={weights['b']}", "--models-dir", str(folder)),
        ]
    )
    server = build_server(args)
    assert server.engine.info.arch == "effunet-lite0-3scale", "the shipped weights stay the default"
    assert server.engines["b"].info.version == "b1"
    server.start()
    try:
        assert server.service.models.names() == ["default", "a", "b"]
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--weights", "lung=/nonexistent/w.pt"], "--weights lung=/nonexistent/w.pt: weights file not found"),
        (["--models-dir", "/nonexistent/models"], "--models-dir: folder not found: /nonexistent/models"),
        (["--weights", "bad name=x.pt"], "'bad name' is not a valid model name"),
    ],
)
def test_serve_refuses_bad_model_flags_in_one_line(weights, extra, words, capsys):
    assert main(["serve", "--weights", str(weights["d"]), "--device", "cpu", "--port", "0", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_serve_refuses_a_folder_file_that_clashes_or_fails_at_start(weights, tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(weights["a1"], folder / "default.pt")
    argv = ["serve", "--weights", str(weights["d"]), "--device", "cpu", "--port", "0", "--no-http"]
    assert main([*argv, "--models-dir", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "default.pt" in err[0] and "rename the file" in err[0], err
    (folder / "default.pt").unlink()
    (folder / "half.pt").write_bytes(b"\x80\x02 cut short")
    assert main([*argv, "--models-dir", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load" in err[0] and "half.pt" in err[0], err


# ------------------------------------------------------------ SIGHUP on a real server process


def _wait_for(proc: ServeProcess, msg: str, after: int, timeout: float = 120.0) -> dict:
    """The first log event ``msg`` among the process's lines from index ``after`` on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.lines[after:]:
            if line.startswith("{") and json.loads(line)["msg"] == msg:
                return json.loads(line)
        time.sleep(0.01)
    raise AssertionError(f"no {msg!r} in the server log:\n" + "".join(proc.lines[-20:]))


def test_sighup_reloads_the_folder_under_load_and_no_request_fails(weights, tmp_path, tile, expected):
    """Threads send requests naming "a", "b" and none without pause; the file
    behind "a" is replaced and "c" added, then SIGHUP.  Every request succeeds
    with the answer of a model of the name it gave: "a" by the old file until
    the swap and by the new one after, and requests that were in flight
    across the swap finish with the model they started with."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(weights["a1"], folder / "a.pt")
    shutil.copy(weights["b"], folder / "b.pt")
    allowed = {"default": {"tiny-d d1"}, "a": {"tiny-a a1", "tiny-a a2"}, "b": {"tiny-b b1"}, "c": {"tiny-c c1"}}
    with ServeProcess(weights["d"], "--models-dir", str(folder), *SERVE_FLAGS) as srv:
        done: list[tuple[str, pb.SegmentResponse, float]] = []
        failures: list[BaseException] = []
        stop = threading.Event()
        reloaded_at: list[float] = []

        def worker(names: list[str]) -> None:
            with grpc.insecure_channel(srv.grpc) as channel:
                stub = pb_grpc.NuClickStub(channel)
                k = 0
                while not stop.is_set():
                    name = names[k % len(names)]
                    if name == "c" and not reloaded_at:
                        name = "a"
                    k += 1
                    try:
                        resp = stub.Segment(request(tile, name, f"{name}-{k}"), timeout=120)
                    except BaseException as exc:  # every failure is the test's business
                        failures.append(exc)
                        return
                    done.append((name or "default", resp, time.monotonic()))

        threads = [threading.Thread(target=worker, args=(names,)) for names in (["a"], ["a", "c"], ["b", ""])]
        for t in threads:
            t.start()
        try:
            while len(done) < 6 and not failures:
                time.sleep(0.01)
            replacement = folder / ".a.pt.new"  # written beside, then renamed: the folder never holds half a file
            shutil.copy(weights["a2"], replacement)
            os.replace(replacement, folder / "a.pt")
            shutil.copy(weights["c"], folder / "c.pt")
            mark = len(srv.lines)
            srv.signal(signal.SIGHUP)
            event = _wait_for(srv, "models reloaded", mark)
            reloaded_at.append(time.monotonic())
            assert (event["added"], event["reloaded"], event["removed"]) == (["c"], ["a"], [])
            while not failures and sum(1 for _, r, t in done if t > reloaded_at[0] and r.model == "tiny-a a2") < 4:
                time.sleep(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join(180)
        assert not failures, failures
        assert not any('"models reload failed"' in line for line in srv.lines)
    for name, resp, _ in done:
        assert resp.model_name == name and resp.model in allowed[name], (name, resp.model)
        assert_answer(resp, expected[resp.model])
    seen = {resp.model for _, resp, _ in done}
    assert {"tiny-a a1", "tiny-a a2", "tiny-b b1", "tiny-c c1", "tiny-d d1"} <= seen
    # Answered by the old file after the new one was already serving: in flight across the swap.
    straddled = [r for name, r, t in done if name == "a" and r.model == "tiny-a a1" and t > reloaded_at[0]]
    assert straddled, "no request was in flight across the swap"


def test_sighup_with_a_bad_file_keeps_the_models_and_a_removed_file_leaves(weights, tmp_path, tile, expected):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(weights["a1"], folder / "a.pt")
    shutil.copy(weights["b"], folder / "b.pt")
    with ServeProcess(weights["d"], "--models-dir", str(folder), *SERVE_FLAGS) as srv:
        with NuClickClient(srv.grpc, timeout=120) as client:
            names = [m.name for m in client.info().models]
        assert names == ["default", "a", "b"]
        (folder / "c.pt").write_bytes(b"PK\x03\x04 half a zip")
        mark = len(srv.lines)
        srv.signal(signal.SIGHUP)
        event = _wait_for(srv, "models reload failed", mark)
        assert event["level"] == "error" and f"cannot load {folder / 'c.pt'}" in event["reason"]
        assert event["models"] == ["default", "a", "b"]
        with grpc.insecure_channel(srv.grpc) as channel:
            stub = pb_grpc.NuClickStub(channel)
            assert [m.name for m in stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).models] == names
            assert_answer(stub.Segment(request(tile, "b"), timeout=120), expected["tiny-b b1"])
            (folder / "c.pt").unlink()
            (folder / "b.pt").unlink()
            mark = len(srv.lines)
            srv.signal(signal.SIGHUP)
            event = _wait_for(srv, "models reloaded", mark)
            assert (event["removed"], event["models"]) == (["b"], ["default", "a"])
            with pytest.raises(grpc.RpcError) as info:
                stub.Segment(request(tile, "b"), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == "this server has no model named 'b'; its models are: default, a"
        srv.signal(signal.SIGTERM)
        assert srv.wait(60) == 0


# ------------------------------------------------------------ the commands' --model-name


def _features(path: Path) -> dict[str, dict]:
    return {json.dumps(f["geometry"]): f["properties"] for f in json.loads(path.read_text())["features"]}


def test_segment_and_qupath_commands_use_the_model_they_name(two_models, weights, tile, tmp_path, cli):
    import tifffile

    from bridge.commands.qupath import run_on
    from support.qupath_memory import MemoryEntry, MemoryProject

    img, clicks = tile
    local = [(c.x - ORIGIN[0], c.y - ORIGIN[1]) for c in clicks]
    tif = tmp_path / "tile.tif"
    tifffile.imwrite(tif, img, photometric="rgb")
    points = tmp_path / "points.csv"
    points.write_text("x,y\n" + "".join(f"{x!r},{y!r}\n" for x, y in local))
    server = ("--server", f"127.0.0.1:{two_models.grpc_port}")
    here = ("--device", "cpu", "--precision", "fp32", "--backend", "torch", "--batch-size", "1")
    answers = {}
    for name in ("b", "a"):
        remote, local_out = tmp_path / f"{name}-server.geojson", tmp_path / f"{name}-here.geojson"
        assert cli("segment", tif, "--points", points, "--out", remote, *server, "--model-name", name).returncode == 0
        file = {"b": weights["b"], "a": weights["a1"]}[name]
        assert cli("segment", tif, "--points", points, "--out", local_out, "--weights", file, *here).returncode == 0
        answers[name] = _features(remote)
        assert answers[name].keys() == _features(local_out).keys() and len(answers[name]) >= 5
    assert answers["a"].keys() != answers["b"].keys()

    # qupath on an in-memory project, through the same server and model
    annotations = [
        {
            "type": "Feature",
            "geometry": {"type": "MultiPoint", "coordinates": [list(p) for p in local]},
            "properties": {"objectType": "annotation"},
        }
    ]
    entry = MemoryEntry("tile.tif", tif.as_uri(), annotations)
    args = build_parser().parse_args(["qupath", str(tmp_path), *server, "--model-name", "b"])
    assert run_on(MemoryProject(tmp_path, [entry]), args) == 0
    assert {json.dumps(d["geometry"]) for d in entry.detections} == answers["b"].keys()


def test_model_name_needs_a_server_and_an_unknown_one_is_one_line(two_models, tile, tmp_path, cli):
    from PIL import Image

    img, clicks = tile
    png = tmp_path / "tile.png"
    Image.fromarray(img).save(png)
    points = tmp_path / "points.csv"
    points.write_text("x,y\n" + "".join(f"{c.x - ORIGIN[0]!r},{c.y - ORIGIN[1]!r}\n" for c in clicks))
    out = tmp_path / "out.geojson"
    done = cli("segment", png, "--points", points, "--out", out, "--model-name", "b")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "nuclick-bridge segment: error: --model-name picks one of a server's models (with --server); "
        "here use --weights FILE for other weights"
    ]
    target = f"127.0.0.1:{two_models.grpc_port}"
    done = cli("segment", png, "--points", points, "--out", out, "--server", target, "--model-name", "lung")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"nuclick-bridge segment: error: NuClick server {target} has no model named 'lung'; "
        "its models are: default, a, b"
    ]
    assert not out.exists()


def test_every_command_that_takes_server_takes_model_name():
    from bridge.client import RemoteSegmenter

    for argv in (
        ["segment", "img.png", "--points", "p.csv", "--out", "o.geojson"],
        ["qupath", "proj"],
        ["omero", "--host", "omero.lab", "--image", "1"],
    ):
        args = build_parser().parse_args([*argv, "--server", "gpu-box:50051", "--model-name", "lung"])
        segmenter = RemoteSegmenter.from_args(args)
        try:
            assert segmenter.client.model == "lung", argv[0]
        finally:
            segmenter.close()
        assert build_parser().parse_args(argv).model_name is None
