"""deploy/nginx/nuclick.conf, run by Debian's nginx on 127.0.0.1 in front of two
real replicas: HTTP/JSON calls go through it, spread over both, the token
passes through, a stopped replica costs nothing, and the QuPath extension's
Java end-to-end test passes through it.

nginx runs as a plain foreground process with a temporary prefix; the shipped
file is included as it is, with only its upstream servers and listen address
replaced (the test fails if those lines change shape).  ``make test``
installs nginx (scripts/install_nginx.sh); without it the tests skip, except
in CI where they fail.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

# The QuPath extension's Java build and its end-to-end case (a real crop, Python's plan and answer).
import test_qupath_extension as qupath_ext
from PIL import Image

from bridge.results import Click
from bridge.service.server import NuClickServer
from support.models import TextureModel, engine_for

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "deploy" / "nginx" / "nuclick.conf"
NGINX = Path("/usr/sbin/nginx")
TOKEN = "e2e-token-4711"  # the QuPath extension's end-to-end case uses this token
java_build, case = qupath_ext.java_build, qupath_ext.case  # its fixtures, shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def replicas():
    servers = [
        NuClickServer(engine_for(TextureModel(), "texture"), port=0, http_port=0, token=TOKEN).start() for _ in range(2)
    ]
    yield servers
    for s in servers:
        s.stop(grace=0)


def proxy_config(upstreams: list[int], port: int) -> str:
    """The shipped file with our ports: every upstream ``server`` line is
    replaced by one per replica, the listen address by ``port``."""
    text = CONF.read_text()
    servers = re.findall(r"^( *)server 127\.0\.0\.1:\d+ (.*);$", text, flags=re.M)
    assert len(servers) == 2, "deploy/nginx/nuclick.conf: expected two 'server 127.0.0.1:PORT ...;' lines"
    indent, params = servers[0]
    lines = "\n".join(f"{indent}server 127.0.0.1:{p} {params};" for p in upstreams)
    text = re.sub(r"^ *server 127\.0\.0\.1:\d+ .*;\n", "", text, flags=re.M)
    text = text.replace("    least_conn;\n", "    least_conn;\n" + lines + "\n", 1)
    text, n = re.subn(r"listen 127\.0\.0\.1:8080;", f"listen 127.0.0.1:{port};", text)
    assert n == 1, "deploy/nginx/nuclick.conf: expected 'listen 127.0.0.1:8080;'"
    return text


@pytest.fixture(scope="module")
def nginx(replicas, tmp_path_factory):
    if not NGINX.is_file():
        why = f"{NGINX} is missing: run 'bash scripts/install_nginx.sh' (make test does)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    prefix = tmp_path_factory.mktemp("nginx")
    prefix.chmod(0o755)
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / d).mkdir()
        (prefix / d).chmod(0o777)  # nginx's workers drop root for 'nobody'
    port = free_port()
    (prefix / "nuclick.conf").write_text(proxy_config([s.http_port for s in replicas], port))
    temp = "\n".join(f"    {d}_temp_path {prefix / d};" for d in ("proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} warn;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n    access_log off;\n    client_body_temp_path {prefix / 'body'};\n{temp}\n"
        f"    include {prefix / 'nuclick.conf'};\n}}\n"
    )
    cmd = [str(NGINX), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    check = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "nginx did not start listening"
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


def call(url: str, body: bytes | None = None, token: str | None = TOKEN) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def segment_body(img: np.ndarray, x0: int, y0: int, clicks: list[Click]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    req = {
        "tile": {
            "encoding": "PNG",
            "data": base64.b64encode(buf.getvalue()).decode(),
            "width": img.shape[1],
            "height": img.shape[0],
            "originX": x0,
            "originY": y0,
        },
        "clicks": [{"x": c.x, "y": c.y, "id": c.id, "className": c.class_name or ""} for c in clicks],
    }
    return json.dumps(req).encode()


def test_calls_through_nginx_are_spread_checked_for_the_token_and_answered_as_directly(nginx, replicas, crop_pair):
    img, _ = crop_pair
    status, body = call(nginx + "/v1/model", token=None)
    assert status == 401 and json.loads(body)["code"] == "UNAUTHENTICATED"  # the replica refused it
    assert call(nginx + "/v1/model", token="wrong")[0] == 401
    status, body = call(nginx + "/v1/model")
    assert status == 200 and json.loads(body)["model"]["name"] == "texture"
    assert call(nginx + "/healthz", token=None) == (200, b'{"status": "SERVING"}')
    assert call(nginx + "/metrics")[0] == 404  # per replica, not through the proxy

    requests = [
        segment_body(img[y : y + 128, x : x + 128], x, y, [Click(x + 64.5, y + 60.5, f"c{x}-{y}", "Tumor")])
        for x in (0, 64, 128)
        for y in (0, 64, 128)
    ]
    before = [s.stats()["requests"] for s in replicas]
    via_proxy = [call(nginx + "/v1/segment", r) for r in requests]
    spread = [s.stats()["requests"] - b for s, b in zip(replicas, before, strict=True)]
    assert all(status == 200 for status, _ in via_proxy), via_proxy
    assert sum(spread) == len(requests) and min(spread) >= 1, spread  # each once, both replicas used
    direct = [call(f"http://127.0.0.1:{replicas[0].http_port}/v1/segment", r) for r in requests]
    assert [json.loads(b) for _, b in via_proxy] == [json.loads(b) for _, b in direct]
    assert any(json.loads(b)["results"][0]["found"] for _, b in via_proxy)

    status, body = call(nginx + "/v1/segmentStream", b"\n".join(requests[:3]) + b"\n")
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    assert status == 200 and lines == [json.loads(b) for _, b in direct[:3]]


def test_java_end_to_end_through_nginx(nginx, replicas, java_build, case):
    """The extension's own end-to-end test, with nginx's URL as its server."""
    png, case_file = case
    env = dict(
        os.environ,
        NUCLICK_E2E_URL=nginx,
        NUCLICK_E2E_TOKEN=TOKEN,
        NUCLICK_E2E_IMAGE=str(png),
        NUCLICK_E2E_CASE=str(case_file),
    )
    before = [s.stats()["requests"] for s in replicas]
    cmd = [
        "bash",
        str(qupath_ext.JAVATEST),
        "test",
        "--select-class",
        "qupath.ext.nuclick.core.EndToEndTest",
        "--details=tree",
    ]
    out = subprocess.run([*cmd, "--disable-ansi-colors"], capture_output=True, text=True, timeout=600, env=env)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    tally = dict((k, int(v)) for v, k in re.findall(r"\[\s*(\d+) tests (found|skipped|successful|failed)\s*\]", report))
    assert tally.get("skipped") == 0 and tally.get("failed") == 0 and tally.get("successful", 0) >= 7, report
    assert all(s.stats()["requests"] > b for s, b in zip(replicas, before, strict=True))  # both did tiles


def test_a_stopped_replica_costs_nothing_through_nginx(nginx, replicas, crop_pair):
    img, _ = crop_pair
    body = segment_body(img[:128, :128], 0, 0, [Click(64.5, 60.5, "a")])
    replicas[0].stop(grace=0)  # its port now refuses connections
    before = replicas[1].stats()["requests"]
    answers = [call(nginx + "/v1/segment", body) for _ in range(4)]
    assert [s for s, _ in answers] == [200] * 4, answers
    assert replicas[1].stats()["requests"] - before == 4
    assert len({b for _, b in answers}) == 1
