"""Real networks with known behaviour, for the service's tests and benchmarks.

They are genuine ``torch.nn.Module``s run by the real engine, batcher and
server; only their weights are not learned, so that tests can check
geometry (a disc of known radius around each click) instead of accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from bridge.engine import NuClickEngine
from bridge.model.weights import ModelInfo


class DiscModel(torch.nn.Module):
    """Logits positive within ~``radius`` model pixels of the inclusion peak."""

    def __init__(self, radius: float = 5.0, sigma: float = 2.0, delay_s: float = 0.0) -> None:
        super().__init__()
        self.level = float(np.exp(-(radius**2) / (2 * sigma**2)))
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)  # a slow device, for cancellation and shutdown tests
        return 50.0 * (x[:, 3:4] - self.level)


class TextureModel(torch.nn.Module):
    """A disc that the image and the neighbours' exclusion maps bend: nuclei
    touch and overlap, and every probability depends on the pixels, as with
    a trained network (a fixed random convolution, seeded)."""

    def __init__(self, radius: float = 9.0, sigma: float = 2.0, seed: int = 0) -> None:
        super().__init__()
        self.level = float(np.exp(-(radius**2) / (2 * sigma**2)))
        gen = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 1, 5, padding=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.3)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        incl = torch.nn.functional.avg_pool2d(x[:, 3:4], 9, stride=1, padding=4) * 20
        return 30.0 * (x[:, 3:4] - self.level) + incl - 20.0 * x[:, 4:5] + self.conv(x[:, :3])


def engine_for(model: torch.nn.Module, name: str = "test", pixel_size_um: float = 0.25, **kw) -> NuClickEngine:
    info = ModelInfo(name, "test", "", 0.0, pixel_size_um=pixel_size_um)
    return NuClickEngine(model, info, device="cpu", **kw)


class ServeProcess:
    """A real ``nuclick-bridge serve`` in a child process on 127.0.0.1, on ports
    it picks itself (port 0), read from its ``listening`` log line: for tests
    and benchmarks that kill replicas."""

    def __init__(self, weights: str | Path, *flags: str, startup_s: float = 180.0) -> None:
        cmd = [sys.executable, "-m", "bridge.cli", "serve", "--weights", str(weights), "--device", "cpu"]
        cmd += ["--port", "0", "--http-port", "0", *flags]
        env = dict(os.environ, GRPC_VERBOSITY="ERROR")
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(startup_s):
            self.kill()
            raise RuntimeError("nuclick-bridge serve did not start:\n" + "".join(self.lines[-20:]))
        event = json.loads(next(line for line in self.lines if '"msg": "listening"' in line))
        self.grpc = event["grpc"]
        self.http = event["http"]

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if '"msg": "listening"' in line:
                self._listening.set()

    def metrics(self, token: str | None = None, timeout: float = 30.0) -> dict[str, float]:
        """This replica's ``GET /metrics``, as {sample name with labels: value}."""
        from prometheus_client.parser import text_string_to_metric_families

        req = urllib.request.Request(f"http://{self.http}/metrics")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode("utf-8")
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
