"""``nuclick-bridge serve``: the weights it picks, its errors, and a real
server process that answers and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from bridge.cli import build_parser, main
from bridge.client import NuClickClient
from bridge.commands.serve import build_server
from bridge.model import weights as weights_module
from bridge.model.network import NuClickNet
from bridge.model.weights import save_weights
from bridge.results import Click


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    save_weights(path, NuClickNet(0.125), {"name": "tiny", "version": "t1", "pixel_size_um": 0.25})
    return path


def test_serve_without_weights_gives_load_models_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(weights_module, "default_weights_path", lambda: tmp_path / "nuclick_default.pt")
    assert main(["serve", "--port", "0", "--no-http"]) == 2
    err = capsys.readouterr().err
    assert "no trained NuClick weights are installed" in err and "--weights FILE" in err


def test_serve_picks_up_the_shipped_weights_once_they_exist(monkeypatch, tmp_path, weights_file):
    shipped = tmp_path / "nuclick_default.pt"
    shipped.write_bytes(weights_file.read_bytes())
    monkeypatch.setattr(weights_module, "default_weights_path", lambda: shipped)
    args = build_parser().parse_args(["serve", "--port", "0", "--http-port", "0", "--device", "cpu"])
    server = build_server(args)
    assert (server.engine.info.name, server.engine.info.version) == ("tiny", "t1")
    assert server.host == "127.0.0.1"  # localhost unless told otherwise


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--max-batch", "0"], "max-batch must be at least 1"),
        (["--port", "70000"], "--port must be between"),
        (["--token-file", "/nonexistent/token"], "token file not found"),
        (["--tls-cert", "/nonexistent/c.pem"], "needs both --tls-cert and --tls-key"),
        (["--workers", "4"], "--workers (4) must exceed --max-streams (8)"),
    ],
)
def test_serve_flags_are_checked(argv, words, weights_file, capsys):
    assert main(["serve", "--weights", str(weights_file), *argv]) == 2
    assert words in capsys.readouterr().err


def test_serve_process_answers_and_stops_gracefully_on_sigterm(weights_file, tmp_path, crop_pair):
    img, _ = crop_pair
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    cmd = [sys.executable, "-m", "bridge.cli", "serve", "--weights", str(weights_file), "--device", "cpu"]
    cmd += ["--port", "0", "--http-port", "0", "--token-file", str(token)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    listening = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if '"msg": "listening"' in line:
                listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert listening.wait(120), "".join(lines)
        event = json.loads(next(line for line in lines if '"msg": "listening"' in line))
        assert event["level"] == "info" and event["model"] == "tiny" and event["auth"] is True
        assert event["grpc"].startswith("127.0.0.1:")
        with NuClickClient(event["grpc"], token="tok-123", timeout=120) as cl:
            assert cl.info().model_name == "tiny"
            results = cl.segment(img[:128, :128], [Click(64.5, 64.5, "a", "Tumor")])
            assert [r.click.id for r in results] == ["a"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    events = [json.loads(line) for line in lines if line.startswith("{")]
    msgs = [e["msg"] for e in events]
    assert "signal" in msgs and msgs[-1] == "stopped", msgs
    seg = next(e for e in events if e["msg"] == "segment")
    assert seg["status"] == "OK" and seg["clicks"] == 1 and "ms" in seg
    assert "tok-123" not in "".join(lines)  # the token never reaches the log
