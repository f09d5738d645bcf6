"""Many replicas behind one name: the target parser, gRPC's round_robin with
client-side health checking, tile-level retries when a replica dies, and the
servers' Prometheus metrics.

The replicas are real ``nuclick-bridge serve`` processes on 127.0.0.1 running a
small network with random weights in fp32 with ``--max-batch 1``: a patch's
probabilities then do not depend on which other patches share its batch (they
do by ~1e-7 between batch sizes 1 and N on CPU), so any spread of tiles over
replicas must give the single-server answer to the last bit.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from PIL import Image

from bridge.client import NuClickClient, ServerError, TileJob
from bridge.errors import BridgeInputError
from bridge.evaluation.clicks import simulate_clicks
from bridge.model.network import NuClickNet
from bridge.model.weights import save_weights
from bridge.results import Click
from bridge.service.core import Limits
from bridge.service.server import SERVICE_NAME, NuClickServer
from bridge.targets import parse_target
from support.models import DiscModel, TextureModel, engine_for
from support.serve import ServeProcess

REPLICA_FLAGS = ("--precision", "fp32", "--max-batch", "1", "--threads", "1", "--max-tile-side", "512")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ targets


@pytest.mark.parametrize(
    "text, grpc_target, n",
    [
        ("127.0.0.1:50051", "127.0.0.1:50051", 1),
        ("gpu-box:50051", "gpu-box:50051", 1),
        (" 127.0.0.1:1, 127.0.0.1:2 ,127.0.0.1:3", "ipv4:127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", 3),
        ("localhost:7,127.0.0.2:7", "ipv4:127.0.0.1:7,127.0.0.2:7", 2),
        ("[::1]:5,[::2]:6", "ipv6:[::1]:5,[::2]:6", 2),
        ("dns:///nuclick.lab.svc.cluster.local:50051", "dns:///nuclick.lab.svc.cluster.local:50051", 0),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1", 0),
    ],
)
def test_every_form_of_target_becomes_a_grpc_target(text, grpc_target, n):
    t = parse_target(text)
    assert (t.grpc, t.addresses, t.text) == (grpc_target, n, text.strip())


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "--server is empty"),
        (" , ", "--server is empty"),
        ("127.0.0.1:1,,127.0.0.1:2", "an empty entry"),
        ("nohost", "--server must be HOST:PORT"),
        ("127.0.0.1:99999", "from 1 to 65535"),
        ("127.0.0.1:http", "from 1 to 65535"),
        ("::1:50051", "[ADDRESS]:PORT"),
        ("bad host!:1", "not a host name"),
        ("127.0.0.1:5,127.0.0.1:5", "same server twice"),
        ("127.0.0.1:5,[::1]:5", "mixes IPv4 and IPv6"),
        ("http://gpu:50051", "unknown scheme"),
        ("dns:///", "names no address"),
        ("no-such-host.invalid:1,127.0.0.1:2", "cannot resolve"),
    ],
)
def test_a_bad_target_is_one_clear_line(text, words):
    with pytest.raises(BridgeInputError) as info:
        parse_target(text)
    assert words in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------- balancing and health


def test_round_robin_spreads_calls_and_skips_a_replica_that_is_not_serving(crop_pair):
    img, _ = crop_pair
    a = NuClickServer(engine_for(DiscModel(), "a"), port=0, http_port=None).start()
    b = NuClickServer(engine_for(DiscModel(), "b"), port=0, http_port=None).start()
    tile, clicks = img[:96, :96], [Click(40.5, 40.5, "c")]
    try:
        with NuClickClient(f"127.0.0.1:{a.grpc_port},127.0.0.1:{b.grpc_port}", timeout=30) as cl:
            for _ in range(8):
                assert cl.segment(tile, clicks)[0].found
            assert a.stats()["requests"] >= 2 and b.stats()["requests"] >= 2
            assert a.stats()["requests"] + b.stats()["requests"] == 8
            a._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)  # as when it drains
            time.sleep(0.5)  # the health watch streams the change to the client
            before = a.stats()["requests"]
            for _ in range(8):
                assert cl.segment(tile, clicks)[0].found
            assert a.stats()["requests"] == before  # no new work for it
            a._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            deadline = time.monotonic() + 10
            while a.stats()["requests"] == before and time.monotonic() < deadline:
                cl.segment(tile, clicks)
            assert a.stats()["requests"] > before  # back in the rotation
    finally:
        a.stop(grace=0)
        b.stop(grace=0)


def test_every_replica_down_is_one_line_after_the_retries_never_a_hang(crop_pair, tmp_path):
    img, _ = crop_pair
    Image.fromarray(img).save(tmp_path / "i.png")
    (tmp_path / "c.csv").write_text("x,y\n10,10\n")
    target = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    with NuClickClient(target, retries=2, backoff=0.01, timeout=10) as cl, pytest.raises(ServerError) as info:
        cl.info()
    assert info.value.code == "UNAVAILABLE" and "cannot reach" in str(info.value) and target in str(info.value)
    assert cl.retry_count == 2
    cmd = [sys.executable, "-m", "bridge.cli", "segment", str(tmp_path / "i.png"), "--points", str(tmp_path / "c.csv")]
    cmd += ["--out", str(tmp_path / "o.geojson"), "--server", target]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # never a hang
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "error: cannot reach the NuClick server at " + target in lines[0], lines
    assert not (tmp_path / "o.geojson").exists()


def test_an_abandoned_run_cancels_its_tiles_in_flight(crop_pair):
    """A tile that cannot be read ends the run with its own reason at once, and
    the tiles still in flight are cancelled: the server drops their work."""
    img, _ = crop_pair
    slow = engine_for(DiscModel(delay_s=0.2), "slow")
    srv = NuClickServer(slow, port=0, http_port=None, limits=Limits(max_batch=1)).start()  # 0.2 s a patch

    def unreadable() -> np.ndarray:
        raise BridgeInputError("slide.tif is truncated near x=512")

    clicks = [Click(20.5 + 10 * k, 64.5, f"c{k}") for k in range(8)]  # 8 patches: > 1.6 s per tile
    jobs = [TileJob(img[:128, :128], clicks) for _ in range(3)] + [TileJob(unreadable, clicks[:1])]
    try:
        with NuClickClient(f"127.0.0.1:{srv.grpc_port}", concurrency=4, timeout=60) as cl:
            with pytest.raises(BridgeInputError, match="truncated"):
                list(cl.segment_parallel(jobs))
            deadline = time.monotonic() + 30
            while srv.stats()["cancelled"] < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = srv.stats()
            assert stats["cancelled"] == 3 and stats["requests"] == 3, stats  # dropped, not finished
            assert stats["batch_patches"] < 3 * len(clicks)  # the rest of their patches never ran
    finally:
        srv.stop(grace=0)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--server", ""], "--server is empty"),
        (["--server", "127.0.0.1:1,"], "an empty entry"),
        (["--server", "127.0.0.1:0"], "from 1 to 65535"),
        (["--server", "127.0.0.1:1", "--concurrency", "0"], "--concurrency must be between 1 and 256"),
        (["--concurrency", "4"], "--concurrency applies to --server only"),
    ],
)
def test_segment_refuses_bad_server_flags_in_one_line(extra, words, crop_pair, tmp_path, cli):
    img, _ = crop_pair
    Image.fromarray(img).save(tmp_path / "i.png")
    (tmp_path / "c.csv").write_text("x,y\n10,10\n")
    r = cli("segment", tmp_path / "i.png", "--points", tmp_path / "c.csv", "--out", tmp_path / "o.json", *extra)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ------------------------------------------------------------------ metrics


def _get(url: str, token: str | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


def test_metrics_count_what_the_server_did_and_follow_the_token_rule(crop_pair):
    from prometheus_client.parser import text_string_to_metric_families

    img, _ = crop_pair
    srv = NuClickServer(engine_for(DiscModel(), "disc"), port=0, http_port=0, token="m-tok").start()
    other = NuClickServer(engine_for(DiscModel(), "other"), port=0, http_port=0).start()  # its own registry
    try:
        base = f"http://127.0.0.1:{srv.http_port}"
        assert _get(base + "/metrics")[0] == 401
        assert _get(base + "/metrics", "wrong")[0] == 401
        assert _get(base + "/healthz")[0] == 200  # health stays open
        with NuClickClient(f"127.0.0.1:{srv.grpc_port}", token="m-tok") as cl:
            cl.info()
            # 3 answered clicks (2 found: one is off the tile's image), plus 1 context click
            got = cl.segment(
                img[:128, :128],
                [Click(40.5, 40.5, "a"), Click(90.5, 90.5, "b"), Click(127.9, 127.9, "c")],
                context=[Click(60.5, 40.5, "ctx")],
            )
            with pytest.raises(ServerError):
                cl.segment(img[:64, :64], [Click(100.0, 5.0, "far")])
        status, ctype, text = _get(base + "/metrics", "m-tok")
        assert status == 200 and ctype.startswith("text/plain")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        assert samples[("nuclick_clicks_total", ())] == 3
        assert samples[("nuclick_nuclei_found_total", ())] == sum(r.found for r in got) >= 2
        assert samples[("nuclick_requests_total", (("code", "OK"), ("method", "Segment")))] == 1
        assert samples[("nuclick_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Segment")))] == 1
        assert samples[("nuclick_requests_total", (("code", "OK"), ("method", "GetModelInfo")))] == 1
        assert samples[("nuclick_request_duration_seconds_count", (("method", "Segment"),))] == 2
        patches = srv.stats()["batch_patches"]
        assert patches >= 3 and samples[("nuclick_batch_size_sum", ())] == patches
        assert samples[("nuclick_batch_size_count", ())] == srv.stats()["batch_batches"]
        assert samples[("nuclick_queue_depth", ())] == 0 and samples[("nuclick_requests_in_flight", ())] == 0
        assert samples[("nuclick_model_info", (("device", "cpu"), ("model", "disc"), ("version", "test")))] == 1
        other_text = _get(f"http://127.0.0.1:{other.http_port}/metrics")[2]
        assert "nuclick_clicks_total 0.0" in other_text and 'model="other"' in other_text
    finally:
        srv.stop(grace=0)
        other.stop(grace=0)


# ---------------------------------------------------- replicas that die


@pytest.fixture(scope="module")
def replica_case(tmp_path_factory, monuseg_pair) -> dict:
    """A small random network as a weights file, a real 600x600 crop and one
    click on every other nucleus (a few dozen 512 px tiles)."""
    tmp = tmp_path_factory.mktemp("replicas")
    torch.manual_seed(3)
    weights = tmp / "tiny.pt"
    save_weights(weights, NuClickNet(0.0625), {"name": "tiny", "version": "r1", "pixel_size_um": 0.25})
    img, lab = monuseg_pair
    Image.fromarray(np.ascontiguousarray(img[:600, :600])).save(tmp / "crop.png")
    xy, _ = simulate_clicks(lab[:600, :600], jitter=3, seed=2)
    xy = xy[::2]
    rows = ["x,y,class"] + [f"{x:.3f},{y:.3f},{'Tumor' if k % 3 else 'Stroma'}" for k, (x, y) in enumerate(xy)]
    (tmp / "clicks.csv").write_text("\n".join(rows) + "\n")
    return {"dir": tmp, "weights": weights, "clicks": len(xy)}


def _segment_cmd(case: dict, out: Path, server: str, concurrency: int) -> list[str]:
    d = case["dir"]
    cmd = [sys.executable, "-m", "bridge.cli", "segment", str(d / "crop.png"), "--points", str(d / "clicks.csv")]
    return [*cmd, "--out", str(out), "--server", server, "--concurrency", str(concurrency)]


def _features(path: Path) -> list[dict]:
    doc = json.loads(path.read_text())
    for f in doc["features"]:
        f.pop("id")  # a fresh uuid per run
    return doc["features"]


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _counter(r: ServeProcess, name: str) -> float:
    return r.metrics().get(name, 0.0)


def test_three_replicas_share_the_work_and_lose_nothing_when_two_go_away(replica_case):
    """One run against one replica is the reference.  Then a run over all
    three, whose work is spread (each replica's ``nuclick_clicks_total``) and
    adds up to the clicks exactly once.  Then a run during which one replica
    is SIGKILLed with tiles in flight and another drained with SIGTERM: the
    output equals the reference, feature for feature."""
    case, tmp = replica_case, replica_case["dir"]
    replicas = [ServeProcess(case["weights"], *REPLICA_FLAGS) for _ in range(3)]
    try:
        everyone = ",".join(r.grpc for r in replicas)
        ref = _run(_segment_cmd(case, tmp / "ref.geojson", replicas[2].grpc, 2))
        assert ref["clicks"] == case["clicks"] >= 40 and ref["found"] > 0
        assert ref["found"] + ref["not_found"] == ref["clicks"]
        reference = _features(tmp / "ref.geojson")

        before = [_counter(r, "nuclick_clicks_total") for r in replicas]
        spread = _run(_segment_cmd(case, tmp / "spread.geojson", everyone, 6))
        done = [_counter(r, "nuclick_clicks_total") - b for r, b in zip(replicas, before, strict=True)]
        assert all(d > 0 for d in done), done  # every replica answered tiles
        assert sum(done) == case["clicks"], done  # each click answered once: none lost, none twice
        assert _features(tmp / "spread.geojson") == reference
        assert spread == {**ref, "out": spread["out"], "seconds": spread["seconds"]}
        assert spread["retries"] == 0

        proc = subprocess.Popen(
            _segment_cmd(case, tmp / "killed.geojson", everyone, 6),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        outputs: list[str] = []
        collect = threading.Thread(target=lambda: outputs.extend(proc.communicate(timeout=600)), daemon=True)
        collect.start()

        def busy(r: ServeProcess) -> bool:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if r.metrics().get("nuclick_requests_in_flight", 0) > 0:
                    return True
                time.sleep(0.01)
            return False

        assert busy(replicas[0]), "the run ended before replica 0 got a tile"
        replicas[0].signal(signal.SIGKILL)  # with a tile in flight
        assert busy(replicas[1]), "the run ended before replica 1 got a tile"
        replicas[1].signal(signal.SIGTERM)  # drains: finishes its tiles, refuses new ones
        assert proc.poll() is None  # both happened mid-run
        collect.join(600)
        assert proc.returncode == 0, outputs
        assert replicas[0].wait() == -signal.SIGKILL and replicas[1].wait() == 0
        killed = json.loads(outputs[0].strip().splitlines()[-1])
        assert killed["clicks"] == ref["clicks"] and killed["found"] == ref["found"]
        assert killed["retries"] >= 1 and "sent again" in outputs[1]  # the killed replica's tile came back
        assert _features(tmp / "killed.geojson") == reference
    finally:
        for r in replicas:
            r.kill()


def test_the_qupath_connector_spreads_its_tiles_and_writes_what_one_server_gives(monuseg_pair, tmp_path, capsys):
    """``nuclick-bridge qupath --server A,B --concurrency 3`` on a project (the
    in-memory stand-in for paquo, a real tiled TIFF): both replicas segment
    tiles, and the detections equal those of a run against one server with
    one tile at a time."""
    import tifffile

    from bridge.cli import build_parser
    from bridge.commands.qupath import run_on
    from support.qupath_memory import MemoryEntry, MemoryProject

    img, lab = monuseg_pair
    tif = tmp_path / "crop.tif"
    tifffile.imwrite(tif, np.ascontiguousarray(img[:600, :600]), tile=(128, 128), photometric="rgb")
    xy, _ = simulate_clicks(lab[:600, :600], jitter=3, seed=4)
    points = [[float(x), float(y)] for x, y in xy[::3]]
    annotation = {
        "type": "Feature",
        "geometry": {"type": "MultiPoint", "coordinates": points},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
    }
    limits = Limits(max_tile_side=512)  # many tiles from one image
    servers = [
        NuClickServer(engine_for(TextureModel(), "texture"), port=0, http_port=None, limits=limits).start()
        for _ in range(2)
    ]
    try:
        got = {}
        for name, server, n in (
            ("one", f"127.0.0.1:{servers[0].grpc_port}", "1"),
            ("two", ",".join(f"127.0.0.1:{s.grpc_port}" for s in servers), "3"),
        ):
            entry = MemoryEntry("crop.tif", tif.as_uri(), [annotation])
            before = [s.stats()["requests"] for s in servers]
            args = build_parser().parse_args(["qupath", str(tmp_path), "--server", server, "--concurrency", n])
            assert run_on(MemoryProject(tmp_path, [entry]), args) == 0
            summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert summary["points"] == len(points) and summary["detections"] == len(entry.detections) > 10
            got[name] = sorted(json.dumps([d["geometry"], d["properties"]["classification"]]) for d in entry.detections)
            used = [s.stats()["requests"] - b for s, b in zip(servers, before, strict=True)]
        assert min(used) >= 1, used  # the run after that used both replicas
        assert got["two"] == got["one"]
    finally:
        for s in servers:
            s.stop(grace=0)
