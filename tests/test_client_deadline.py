"""Each call's deadline scales with its work unless ``--timeout`` (or
``NuClickClient(timeout=...)``) fixes it; the server sees the deadline the
command gave; a call past it ends the command in one line that names the fix."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from bridge.cli import build_parser, main
from bridge.client import DEADLINE_BASE_S, NuClickClient, call_deadline
from bridge.commands.common import TIMEOUT_HELP, make_segmenter
from bridge.evaluation.clicks import simulate_clicks
from bridge.results import Click
from bridge.service.convert import click_to_pb, tile_to_pb
from bridge.service.gen import nuclick_pb2 as pb
from bridge.service.gen import nuclick_pb2_grpc as pb_grpc
from bridge.service.server import NuClickServer, NuClickServicer
from support.models import DiscModel, Gate, TextureModel, engine_for


def test_the_default_deadline_grows_with_clicks_pixels_and_tiles_in_flight():
    assert call_deadline() == DEADLINE_BASE_S == 120.0  # never below the former fixed deadline
    assert call_deadline(1000) > call_deadline(100) > call_deadline(1) > call_deadline(0)
    assert call_deadline(100, 16.0) > call_deadline(100, 4.0) > call_deadline(100, 0.0)
    assert call_deadline(100, 4.0, in_flight=4) > call_deadline(100, 4.0, in_flight=1)
    # A 2048 px tile of a thousand clicks, four in flight: time for a server doing 4 nuclei/s.
    assert call_deadline(1000, 2048 * 2048 / 1e6, 4) >= 120 + 4 * 1000 / 4
    words = " ".join(TIMEOUT_HELP.split())  # what --help says is what the code does
    assert "120 s" in words and "0.25 s per click" in words and "2 s per megapixel" in words


def request(clicks: int, side: int) -> pb.SegmentRequest:
    req = pb.SegmentRequest(tile=tile_to_pb(np.zeros((side, side, 3), np.uint8), (0, 0), 1.0, None, "raw"))
    req.clicks.extend(click_to_pb(Click(5.0 + k % side, 5.0, str(k)), False) for k in range(clicks))
    return req


def test_the_client_scales_each_call_unless_given_a_timeout():
    with NuClickClient("127.0.0.1:1") as scaled, NuClickClient("127.0.0.1:1", timeout=42) as fixed:
        assert scaled.timeout is None
        small, big, wide = request(3, 128), request(900, 128), request(3, 2048)
        assert scaled.deadline_for(big) > scaled.deadline_for(small) >= DEADLINE_BASE_S
        assert scaled.deadline_for(wide) > scaled.deadline_for(small)
        assert scaled.deadline_for(big, in_flight=4) > scaled.deadline_for(big)
        assert scaled.deadline_for(pb.GetModelInfoRequest()) == DEADLINE_BASE_S
        assert fixed.deadline_for(big) == fixed.deadline_for(small) == 42
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="--timeout must be a positive number"):
            NuClickClient("127.0.0.1:1", timeout=bad)


@pytest.mark.parametrize("command", ["segment", "qupath", "omero"])
def test_timeout_reaches_the_client_of_every_command_that_segments_on_a_server(command, capsys):
    given = {"segment": ["in.png", "--points", "c.csv", "--out", "o.geojson"], "qupath": ["project"]}
    given["omero"] = ["--host", "omero.lab.org", "--user", "alice", "--dataset", "1"]
    parser = build_parser()
    args = parser.parse_args([command, *given[command], "--server", "127.0.0.1:1", "--timeout", "7.5"])
    segmenter = make_segmenter(args)
    assert segmenter.client.timeout == 7.5
    segmenter.close()
    args = parser.parse_args([command, *given[command], "--server", "127.0.0.1:1"])
    segmenter = make_segmenter(args)
    assert segmenter.client.timeout is None  # scaled with each tile's work
    segmenter.close()
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--timeout SECONDS" in help_text and "scaled with the work" in help_text


@contextlib.contextmanager
def recording(service) -> Iterator[tuple[list[float], str]]:
    """The real service on a real gRPC server that notes how many seconds each
    Segment call had left when it arrived."""
    seen: list[float] = []

    class Recording(NuClickServicer):
        def Segment(self, request, context):
            seen.append(context.time_remaining())
            return super().Segment(request, context)

    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_NuClickServicer_to_server(Recording(service), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield seen, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture
def small_image(crop_pair, tmp_path):
    img, lab = crop_pair
    Image.fromarray(img).save(tmp_path / "crop.png")
    xy, _ = simulate_clicks(lab, jitter=0, seed=0)
    (tmp_path / "c.csv").write_text("x,y\n" + "".join(f"{x:.2f},{y:.2f}\n" for x, y in xy[:10]))
    return ["segment", str(tmp_path / "crop.png"), "--points", str(tmp_path / "c.csv")]


def test_the_server_sees_the_deadline_the_command_gave(small_image, tmp_path, capsys):
    srv = NuClickServer(engine_for(TextureModel(), "texture"), port=0, http_port=None).start()
    try:
        with recording(srv.service) as (seen, target):
            out = ["--out", str(tmp_path / "o.geojson"), "--server", target]
            assert main([*small_image, *out, "--timeout", "30"]) == 0
            assert seen and all(0 < left < 31 for left in seen)  # gRPC rounds a deadline up on the wire
            seen.clear()
            assert main([*small_image, *out]) == 0  # scaled: the base and more
            assert seen and all(left > DEADLINE_BASE_S for left in seen)
    finally:
        srv.stop(grace=1)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["found"] >= 5


def test_a_tiny_timeout_ends_the_command_in_one_line_naming_the_fix(small_image, tmp_path, capsys):
    """A server that cannot finish the tile in time (its model waits at a gate
    the test opens only afterwards): exit 2, one line, no output file."""
    gate = Gate()
    srv = NuClickServer(engine_for(DiscModel(gate=gate), "gated"), port=0, http_port=None).start()
    try:
        out = tmp_path / "o.geojson"
        rc = main([*small_image, "--out", str(out), "--server", f"127.0.0.1:{srv.grpc_port}", "--timeout", "1"])
        err = capsys.readouterr().err
        assert rc == 2 and gate.entered.is_set()
        lines = [ln for ln in err.strip().splitlines() if "error" in ln]
        assert len(lines) == 1 and "did not answer within 1 s" in lines[0] and "--timeout SECONDS" in lines[0], err
        assert "Traceback" not in err and not out.exists()
    finally:
        gate.opened.set()
        srv.stop(grace=1)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--timeout", "5"], "--timeout is the deadline of each call to a server"),
        (["--server", "127.0.0.1:1", "--timeout", "0"], "--timeout must be a positive number of seconds"),
        (["--server", "127.0.0.1:1", "--timeout", "nan"], "--timeout must be a positive number of seconds"),
    ],
)
def test_a_bad_timeout_is_one_line_before_any_work(small_image, tmp_path, capsys, extra, words):
    assert main([*small_image, "--out", str(tmp_path / "o.geojson"), *extra]) == 2
    assert words in capsys.readouterr().err
