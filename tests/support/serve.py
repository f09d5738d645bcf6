"""A real ``nuclick-bridge serve`` in a child process, for tests and benchmarks
that kill or drain replicas (benchmarks/replicas.py puts tests/ on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path


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
