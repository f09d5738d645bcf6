"""Hostile clients against a real ``nuclick-bridge serve``: the long version of
tests/test_http_hostile.py, with figures instead of asserts.

    python benchmarks/hostile.py [--phases stalled,idle,burst,malformed,clients100,soak,latency] [--json FILE]

Every phase starts its own server as a child process on 127.0.0.1 (the
shipped weights unless ``--weights``, a token from ``--token-file``) and sends
it real tiles of a MoNuSeg image with clicks at its nuclei:

stalled     200 connections without a token that stall (100 send a
            ``POST /v1/segment`` head declaring 100000 bytes and one byte of
            body, 100 trickle a request head a byte every 2 s; the ones the
            server closes are opened again), then 20 ``GET /healthz`` and 20
            authorised single-click ``POST /v1/segment`` on fresh connections.
            Target: all answered within 1 s.
idle        200 idle connections: the server's threads, RSS and open files
            before and after, whether /healthz still answers, and how many the
            server has closed after ``--idle-hold`` seconds.
burst       300 gRPC and 300 HTTP single-click calls at once against a server
            with ``--workers 4`` and a short queue: answered, refused busy
            (RESOURCE_EXHAUSTED / 429), other failures; then the same with the
            client retrying (NuClickClient's default; for HTTP a loop that
            honours Retry-After); the server's refusal counters.
malformed   about 45 broken HTTP requests and a dozen garbage gRPC messages: the
            answers by status, whether every error body is ``{code, message}``,
            tracebacks in the server's log, and whether it still answers.
clients100  100 ``nuclick-bridge segment --server`` processes at once on one
            crop of about 50 nuclei (as many at once as memory allows): exit
            codes, failures for capacity, wall time, identical outputs.
soak        8 clients for 10 minutes of mixed gRPC and HTTP tiles: every 30 s
            requests, failures, p50/p95 and the server's RSS; at the end
            whether nothing failed and how much RSS grew.
latency     single-click latency, HTTP and gRPC, of this checkout against a
            baseline revision (``--baseline``, by default the last one before
            the HTTP gateway moved to uvicorn) served from a ``git worktree``,
            requests alternating between the two servers.

Nothing here asserts: each phase prints its figures and, where there is a
target, whether it was met.  The flags' defaults are the full run; every wait
is bounded and everything stays on the loopback interface.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # support.serve: the test suite's child-process server

from bridge.client import NuClickClient  # noqa: E402
from bridge.evaluation.clicks import simulate_clicks  # noqa: E402
from bridge.results import Click  # noqa: E402
from bridge.service.convert import tile_to_pb  # noqa: E402
from bridge.service.gen import nuclick_pb2 as pb  # noqa: E402
from bridge.service.gen import nuclick_pb2_grpc as pb_grpc  # noqa: E402
from support.hostile_clients import (  # noqa: E402
    HOST,
    Stallers,
    exchange,
    malformed_requests,
    mem_available_mb,
    process_stats,
)
from support.serve import ServeProcess  # noqa: E402

PHASES = ("stalled", "idle", "burst", "malformed", "clients100", "soak", "latency")
IMAGE = "TCGA-21-5786-01Z-00-DX1"
SEGMENT = "/nuclick.v1.NuClick/Segment"
CAPACITY_WORDS = ("resource_exhausted", "busy", "too many")


def say(*parts) -> None:
    print(*parts, flush=True)


def verdict(met: bool, target: str, detail: str = "") -> str:
    return f"TARGET {'met' if met else 'NOT met'}: {target}" + (f" ({detail})" if detail else "")


def summary(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    a = np.asarray(ms)
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p95_ms": round(float(np.percentile(a, 95)), 1),
        "max_ms": round(float(a.max()), 1),
    }


def show(s: dict) -> str:
    if not s.get("n"):
        return "no samples"
    return f"p50 {s['p50_ms']:7.1f} ms  p95 {s['p95_ms']:7.1f} ms  max {s['max_ms']:7.1f} ms"


# -------------------------------------------------------------- the image


@dataclass
class Tile:
    """A crop of the image with clicks in it (level-0 coordinates)."""

    pixels: np.ndarray
    origin: tuple[int, int]
    clicks: list[Click]

    def request(self) -> pb.SegmentRequest:
        req = pb.SegmentRequest(tile=tile_to_pb(self.pixels, (float(self.origin[0]), float(self.origin[1]))))
        for c in self.clicks:
            req.clicks.add(x=c.x, y=c.y, id=c.id)
        return req

    def json_body(self) -> bytes:
        return json_format.MessageToJson(self.request(), indent=None).encode()


class Scene:
    """One MoNuSeg image and a click inside each of its nuclei."""

    def __init__(self, data: Path, image: str) -> None:
        self.img = np.ascontiguousarray(
            np.asarray(Image.open(data / "monuseg" / "images" / f"{image}.png").convert("RGB"))
        )
        lab = np.asarray(Image.open(data / "monuseg" / "labels" / f"{image}.png")).astype(np.int32)
        xy, _ = simulate_clicks(lab, jitter=0, seed=0)
        self.xy = xy

    def tiles(self, side: int, count: int, max_clicks: int = 1, seed: int = 0) -> list[Tile]:
        """``count`` tiles of ``side`` px, each around a nucleus, with up to ``max_clicks`` clicks."""
        h, w = self.img.shape[:2]
        rng = np.random.default_rng(seed)
        out = []
        for n, i in enumerate(rng.permutation(len(self.xy))[:count]):
            cx, cy = self.xy[i]
            x0 = int(min(max(cx - side // 2, 0), w - side))
            y0 = int(min(max(cy - side // 2, 0), h - side))
            inside = [
                j
                for j, (x, y) in enumerate(self.xy)
                if j != i and x0 + 8 <= x < x0 + side - 8 and y0 + 8 <= y < y0 + side - 8
            ]
            chosen = [i, *inside[: rng.integers(0, max_clicks)]] if max_clicks > 1 else [i]
            clicks = [Click(float(self.xy[j][0]), float(self.xy[j][1]), f"t{n}c{k}") for k, j in enumerate(chosen)]
            out.append(Tile(np.ascontiguousarray(self.img[y0 : y0 + side, x0 : x0 + side]), (x0, y0), clicks))
        return out

    def crop_with(self, clicks: int) -> tuple[np.ndarray, np.ndarray]:
        """The smallest square crop (on a 32 px grid) holding ``clicks`` nuclei; (pixels, click xy in the crop)."""
        h, w = self.img.shape[:2]
        for side in range(128, min(h, w) + 1, 32):
            for y0 in range(0, h - side + 1, 32):
                for x0 in range(0, w - side + 1, 32):
                    x, y = self.xy[:, 0] - x0, self.xy[:, 1] - y0
                    inside = (x >= 8) & (x < side - 8) & (y >= 8) & (y < side - 8)
                    if inside.sum() >= clicks:
                        pts = np.stack([x[inside], y[inside]], axis=1)[:clicks]
                        return np.ascontiguousarray(self.img[y0 : y0 + side, x0 : x0 + side]), pts
        raise SystemExit(f"no crop of the image holds {clicks} nuclei")


# ------------------------------------------------------------- calling it


def http_call(
    port: int, method: str, path: str, body: bytes | None = None, token: str | None = None, timeout: float = 30.0
) -> tuple[int | None, dict[str, str], bytes, float]:
    """One request on a fresh connection: (status or None, headers, body, milliseconds)."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, 1000 * (time.perf_counter() - t0)
    except (OSError, http.client.HTTPException) as exc:
        return None, {"error": type(exc).__name__}, b"", 1000 * (time.perf_counter() - t0)
    finally:
        conn.close()


def http_port(srv: ServeProcess) -> int:
    return int(srv.http.rsplit(":", 1)[1])


def refusal_metrics(srv: ServeProcess, token: str) -> dict[str, float]:
    """The server's counters with 'refus' or 'queue' in their names (and busy answers by status)."""
    try:
        m = srv.metrics(token)
    except OSError as exc:
        return {"error": str(exc)}  # type: ignore[dict-item]
    keep = ("refus", "queue", "waiting", "RESOURCE_EXHAUSTED")
    return {k: v for k, v in sorted(m.items()) if any(w in k for w in keep) and "_created" not in k}


def metric_delta(before: dict, after: dict) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if isinstance(v, float) and v != before.get(k, 0.0)}


@contextlib.contextmanager
def launched_from(folder: Path) -> Iterator[None]:
    """Child processes started inside see ``folder`` first on their import path
    (cwd and PYTHONPATH): ``python -m bridge.cli`` there runs that checkout's ``bridge``."""
    old_cwd, old_path = os.getcwd(), os.environ.get("PYTHONPATH")
    os.chdir(folder)
    os.environ["PYTHONPATH"] = str(folder) + (os.pathsep + old_path if old_path else "")
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


class Bench:
    """What every phase shares: flags, the image, the token, starting servers."""

    def __init__(self, args) -> None:
        self.args = args
        self.scene = Scene(Path(args.data), args.image)
        if args.weights:
            self.weights = Path(args.weights).resolve()
        else:
            self.weights = ROOT / "bridge" / "weights" / "nuclick_default.pt"
        self.tmp = Path(tempfile.mkdtemp(prefix="nuclick-hostile-"))
        self.token = secrets.token_urlsafe(24)
        self.token_file = self.tmp / "token.txt"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)
        self.single = self.scene.tiles(args.tile, 32)

    def serve(self, *flags: str) -> ServeProcess:
        base = ["--token-file", str(self.token_file), "--precision", self.args.precision]
        if self.args.threads:
            base += ["--threads", str(self.args.threads)]
        return ServeProcess(self.weights, *base, *self.args.serve_flag, *flags)

    def warm(self, srv: ServeProcess, n: int = 3) -> None:
        """A few calls of each kind, so that first-call costs are not measured."""
        with NuClickClient(srv.grpc, token=self.token) as client:
            for t in self.single[:n]:
                client.segment(t.pixels, t.clicks, origin=t.origin)
        for t in self.single[:n]:
            http_call(http_port(srv), "POST", "/v1/segment", t.json_body(), self.token)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _fresh_calls(b: Bench, port: int, n: int, gap: float) -> dict:
    """``n`` GET /healthz and ``n`` authorised single-click segment calls, alternating, each on a fresh connection."""
    out: dict = {"healthz": [], "segment": []}
    statuses: dict = {"healthz": Counter(), "segment": Counter()}
    for k in range(n):
        status, _, _, ms = http_call(port, "GET", "/healthz", timeout=10)
        out["healthz"].append(ms)
        statuses["healthz"][str(status)] += 1
        body = b.single[k % len(b.single)].json_body()
        status, _, _, ms = http_call(port, "POST", "/v1/segment", body, b.token, timeout=10)
        out["segment"].append(ms)
        statuses["segment"][str(status)] += 1
        time.sleep(gap)
    return {k: {**summary(v), "status": dict(statuses[k])} for k, v in out.items()}


def _all_within(figures: dict, limit_ms: float) -> bool:
    return all(f["status"] == {"200": f["n"]} and f["max_ms"] <= limit_ms for f in figures.values())


# ------------------------------------------------------------------ phases


def phase_stalled(b: Bench) -> dict:
    a = b.args
    n_stall = a.stall_body + a.stall_trickle
    say(
        f"== stalled: {a.stall_body} stalled bodies + {a.stall_trickle} trickling heads (a byte every "
        f"{a.trickle_interval:g} s), {a.stall_samples} calls of each kind on fresh connections"
    )
    with b.serve() as srv:
        port, pid = http_port(srv), srv.proc.pid
        b.warm(srv)
        quiet = _fresh_calls(b, port, a.stall_samples, 0.05)
        before = process_stats(pid)
        stallers = Stallers(port, a.stall_body, a.stall_trickle, a.trickle_interval).start()
        try:
            time.sleep(1.0)
            opened = stallers.open_now()
            held = process_stats(pid)
            loaded = _fresh_calls(b, port, a.stall_samples, a.stall_gap)
            at_end = stallers.open_now()
            st = stallers.stats()
        finally:
            stallers.close()
        after = process_stats(pid)
    for label, figs in (("quiet", quiet), ("stalled", loaded)):
        for kind, f in figs.items():
            name = "/healthz" if kind == "healthz" else "segment (1 click)"
            say(f"  {label:8} {name:18} {show(f)}   answers {f['status']}")
    say(
        f"  stallers: open {opened['body']}+{opened['trickle']} of {n_stall} at the start, "
        f"{at_end['body']}+{at_end['trickle']} at the end; closed by the server (and opened again) "
        f"{st['closed_by_server']}; connect failures {st['connect_failures']}; "
        f"answers to them {st['answers_to_stalled'] or 'none'}"
    )
    say(
        f"  server: threads {before['threads']} -> {held['threads']}, RSS {before['rss_mb']:.0f} -> "
        f"{held['rss_mb']:.0f} MB, open files {before['fds']} -> {held['fds']} (after: {after['fds']})"
    )
    met = _all_within(loaded, a.target_ms)
    worst = max(f.get("max_ms", float("inf")) for f in loaded.values())
    target = (
        f"{n_stall} stalled or trickling unauthenticated connections: /healthz and authorised requests are "
        f"still answered within {a.target_ms / 1000:g} s"
    )
    say("  " + verdict(met, target, f"slowest {worst:.0f} ms"))
    return {
        "quiet": quiet,
        "stalled": loaded,
        "stallers": {**st, "open_at_start": opened, "open_at_end": at_end},
        "server_before": before,
        "server_held": held,
        "target": target,
        "target_met": met,
    }


def phase_idle(b: Bench) -> dict:
    a = b.args
    say(f"== idle: {a.idle} idle connections, held {a.idle_hold:g} s")
    with b.serve() as srv:
        port, pid = http_port(srv), srv.proc.pid
        b.warm(srv)
        before = process_stats(pid)
        socks, failed = [], 0
        t0 = time.monotonic()
        for _ in range(a.idle):
            try:
                socks.append(socket.create_connection((HOST, port), timeout=5))
            except OSError:
                failed += 1
        time.sleep(1.0)
        held = process_stats(pid)
        health = [http_call(port, "GET", "/healthz", timeout=10) for _ in range(3)]
        time.sleep(max(0.0, a.idle_hold - (time.monotonic() - t0)))
        closed = 0
        for s in socks:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
            s.close()
        late = process_stats(pid)
        health_after = http_call(port, "GET", "/healthz", timeout=10)
    ok = all(h[0] == 200 for h in health)
    say(f"  opened {len(socks)} (failed {failed})")
    say(
        f"  server threads {before['threads']} -> {held['threads']} ({held['threads'] - before['threads']:+d}), "
        f"RSS {before['rss_mb']:.0f} -> {held['rss_mb']:.0f} MB ({held['rss_mb'] - before['rss_mb']:+.1f}), "
        f"open files {before['fds']} -> {held['fds']}"
    )
    say(f"  /healthz while held: {[h[0] for h in health]} in {', '.join(f'{h[3]:.1f}' for h in health)} ms")
    say(
        f"  after {a.idle_hold:g} s the server had closed {closed} of {len(socks)}; "
        f"threads {late['threads']}, open files {late['fds']}; /healthz then: {health_after[0]}"
    )
    return {
        "opened": len(socks),
        "connect_failures": failed,
        "server_before": before,
        "server_held": held,
        "server_late": late,
        "thread_growth": held["threads"] - before["threads"],
        "rss_growth_mb": round(held["rss_mb"] - before["rss_mb"], 1),
        "healthz_ok": ok,
        "healthz_ms": [round(h[3], 1) for h in health],
        "closed_by_server_after_hold": closed,
    }


def _fire(n: int, call: Callable[[int], str]) -> tuple[Counter, list[float], float]:
    """``n`` threads released at once, each making one ``call(k)`` that returns an outcome label."""
    barrier = threading.Barrier(n + 1)
    outcomes: list[tuple[str, float]] = []

    def worker(k: int) -> None:
        try:
            barrier.wait(60)
        except threading.BrokenBarrierError:
            outcomes.append(("not started", 0.0))
            return
        t0 = time.perf_counter()
        try:
            label = call(k)
        except Exception as exc:
            label = f"client error {type(exc).__name__}"
        outcomes.append((label, 1000 * (time.perf_counter() - t0)))

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    barrier.wait(60)
    t0 = time.perf_counter()
    for t in threads:
        t.join(max(1.0, 600 - (time.perf_counter() - t0)))
    wall = time.perf_counter() - t0
    return Counter(o for o, _ in outcomes), [ms for o, ms in outcomes if o in ("OK", "200")], wall


def _grpc_outcome(err: grpc.RpcError) -> str:
    code = err.code().name
    if code != "RESOURCE_EXHAUSTED":
        return code
    trailing = dict(err.trailing_metadata() or ())
    details = (err.details() or "").lower()
    if "retry-after-ms" in trailing:
        return "RESOURCE_EXHAUSTED (queue full, retry-after-ms)"
    if "concurrent rpc limit" in details:
        return "RESOURCE_EXHAUSTED (gRPC's concurrent-call limit)"
    return f"RESOURCE_EXHAUSTED ({details[:50]})"


def phase_burst(b: Bench) -> dict:
    a = b.args
    flags = ["--workers", str(a.burst_workers), "--queue", str(a.burst_queue), "--max-streams", str(a.burst_streams)]
    say(
        f"== burst: {a.burst_grpc} gRPC and {a.burst_http} HTTP single-click calls at once; server "
        f"{' '.join(flags)}; {a.tile} px tiles"
    )
    tiles = b.single
    bodies = [t.json_body() for t in tiles]
    requests = [t.request() for t in tiles]
    rounds: dict = {}
    with b.serve(*flags) as srv:
        port = http_port(srv)
        b.warm(srv)
        metadata = (("authorization", f"Bearer {b.token}"),)
        channel = grpc.insecure_channel(srv.grpc, options=[("grpc.max_send_message_length", 64 << 20)])
        stub = pb_grpc.NuClickStub(channel)

        def grpc_once(k: int) -> str:
            try:
                stub.Segment(requests[k % len(requests)], timeout=a.burst_deadline, metadata=metadata)
                return "OK"
            except grpc.RpcError as err:
                return _grpc_outcome(err)

        client = NuClickClient(srv.grpc, token=b.token, timeout=a.burst_deadline)

        def grpc_retrying(k: int) -> str:
            t = tiles[k % len(tiles)]
            try:
                client.segment(t.pixels, t.clicks, origin=t.origin)
                return "OK"
            except Exception as exc:
                return f"{getattr(exc, 'code', type(exc).__name__)}"

        retry_after_seen = Counter()

        def http_once(k: int) -> str:
            status, headers, _, _ = http_call(port, "POST", "/v1/segment", bodies[k % len(bodies)], b.token, 60)
            if status == 429:
                retry_after_seen["with Retry-After" if "retry-after" in headers else "without Retry-After"] += 1
            return str(status) if status is not None else f"no answer ({headers.get('error')})"

        attempts = Counter()

        def http_retrying(k: int) -> str:
            deadline = time.monotonic() + a.burst_deadline
            while True:
                status, headers, _, _ = http_call(port, "POST", "/v1/segment", bodies[k % len(bodies)], b.token, 60)
                attempts["calls"] += 1
                left = deadline - time.monotonic()
                if status not in (429, 503) or left <= 0:
                    return str(status) if status is not None else f"no answer ({headers.get('error')})"
                attempts["retries"] += 1
                time.sleep(min(float(headers.get("retry-after", "1")), left))

        plan = [
            ("gRPC, no retries", a.burst_grpc, grpc_once),
            ("HTTP, no retries", a.burst_http, http_once),
            ("gRPC, NuClickClient retrying", a.burst_grpc, grpc_retrying),
            ("HTTP, retrying on Retry-After", a.burst_http, http_retrying),
        ]
        for name, n, call in plan:
            if n <= 0:
                continue
            m0 = refusal_metrics(srv, b.token)
            outcomes, ok_ms, wall = _fire(n, call)
            m1 = refusal_metrics(srv, b.token)
            ok = outcomes.get("OK", 0) + outcomes.get("200", 0)
            busy = sum(v for k, v in outcomes.items() if k.startswith("RESOURCE_EXHAUSTED") or k == "429")
            r = {
                "calls": n,
                "ok": ok,
                "busy": busy,
                "other": n - ok - busy,
                "outcomes": dict(outcomes),
                "ok_latency": summary(ok_ms),
                "wall_s": round(wall, 2),
                "metrics_delta": metric_delta(m0, m1),
            }
            if "NuClickClient" in name:
                r["client_retries"] = client.retry_count
                r["client_busy_retries"] = client.busy_retry_count
            if name.startswith("HTTP, no"):
                r["retry_after"] = dict(retry_after_seen)
            if name.startswith("HTTP, retrying"):
                r["attempts"] = dict(attempts)
            rounds[name] = r
            say(f"  {name}: {ok}/{n} answered, {busy} refused busy, {n - ok - busy} other, in {wall:.1f} s")
            for label, count in sorted(outcomes.items(), key=lambda kv: -kv[1]):
                say(f"      {count:4d}  {label}")
            if ok_ms:
                say(f"      answered: {show(r['ok_latency'])}")
            for key in ("client_retries", "client_busy_retries", "retry_after", "attempts"):
                if key in r:
                    say(f"      {key.replace('_', ' ')}: {r[key]}")
            say(f"      server counters (change): {r['metrics_delta'] or 'none'}")
        client.close()
        channel.close()
        final = refusal_metrics(srv, b.token)
    refusal_names = sorted({k.split("{")[0] for k in final})
    say(f"  refusal and queue metrics the server has: {', '.join(refusal_names) or 'none'}")
    return {"server_flags": flags, "rounds": rounds, "metrics_at_end": final}


def _grpc_garbage(b: Bench, target: str) -> list[dict]:
    """Garbage protobuf bytes on a raw channel (identity serialisers)."""
    rng = np.random.default_rng(1)
    valid = b.single[0].request().SerializeToString()
    auth = (("authorization", f"Bearer {b.token}"),)
    cases = [
        ("random bytes", SEGMENT, rng.bytes(64), auth),
        ("0xff x 100", SEGMENT, b"\xff" * 100, auth),
        ("empty message", SEGMENT, b"", auth),
        ("half of a valid request", SEGMENT, valid[: len(valid) // 2], auth),
        ("length prefix of 4 GB", SEGMENT, b"\x0a\xff\xff\xff\xff\x0f", auth),
        ("field 1 as a varint", SEGMENT, b"\x08\x96\x01", auth),
        ("1 MB of random bytes", SEGMENT, rng.bytes(1 << 20), auth),
        ("valid request without a token", SEGMENT, valid, ()),
        ("garbage to GetModelInfo", "/nuclick.v1.NuClick/GetModelInfo", rng.bytes(64), auth),
        ("unknown method", "/nuclick.v1.NuClick/Nope", b"", auth),
        ("unknown service", "/evil.v1.Evil/Do", b"", auth),
    ]
    out = []
    with grpc.insecure_channel(target) as channel:
        for name, method, data, metadata in cases:
            call = channel.unary_unary(method)  # bytes in, bytes out
            try:
                call(data, timeout=15, metadata=metadata)
                code, details = "OK", ""
            except grpc.RpcError as err:
                code, details = err.code().name, (err.details() or "")[:100]
            out.append({"name": name, "code": code, "details": details})
        stream = channel.stream_stream("/nuclick.v1.NuClick/SegmentStream")
        garbage = [rng.bytes(64), b"\xff" * 10, valid[: len(valid) // 2]]
        try:
            replies = [pb.SegmentResponse.FromString(r) for r in stream(iter(garbage), timeout=15, metadata=auth)]
            # A bad message gets a response with its error set, and the stream goes on.
            errors = [r.error.code for r in replies if r.HasField("error")]
            code = "OK" if len(errors) != len(garbage) else "OK, errors in every response"
            details = f"{len(replies)} responses, errors {errors}"
        except grpc.RpcError as err:
            code, details = err.code().name, (err.details() or "")[:100]
        out.append({"name": "garbage messages on SegmentStream", "code": code, "details": details})
    return out


def phase_malformed(b: Bench) -> dict:
    a = b.args
    good = b.single[0].json_body()
    cases = malformed_requests(b.token, good)
    say(f"== malformed: {len(cases)} broken HTTP requests and garbage gRPC messages, each on a fresh connection")
    rows = []
    with b.serve() as srv:
        port = http_port(srv)
        b.warm(srv)
        first_line = len(srv.lines)
        for case in cases:
            reply = exchange(port, case.data, a.malformed_timeout, case.half_close)
            error_form = reply.status is not None and reply.status >= 400 and reply.status != 499
            rows.append(
                {
                    "name": case.name,
                    "status": reply.status,
                    "code": reply.code(),
                    "json_error": reply.json_error() if error_form else None,
                    "expected": reply.status in case.expect if reply.status is not None else not case.expect,
                    "no_answer": reply.error,
                    "server_header": reply.headers.get("server"),
                }
            )
        grpc_rows = _grpc_garbage(b, srv.grpc)
        raw_grpc = [
            (
                "HTTP/1.1 to the gRPC port",
                exchange(int(srv.grpc.rsplit(":", 1)[1]), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            ),
            ("junk to the gRPC port", exchange(int(srv.grpc.rsplit(":", 1)[1]), bytes(range(256)) * 4)),
        ]
        time.sleep(0.5)  # let the log catch up
        log = srv.lines[first_line:]
        health = http_call(port, "GET", "/healthz", timeout=10)
        seg = http_call(port, "POST", "/v1/segment", good, b.token, timeout=30)
        with NuClickClient(srv.grpc, token=b.token) as client:
            try:
                t = b.single[1]
                grpc_ok = len(client.segment(t.pixels, t.clicks, origin=t.origin)) == len(t.clicks)
            except Exception:
                grpc_ok = False
    for r in rows:
        status = r["status"] if r["status"] is not None else f"--- ({r['no_answer']})"
        form = {True: "json", False: "NOT json", None: ""}[r["json_error"]]
        say(f"  {status!s:18} {form:8} {'' if r['expected'] else 'UNEXPECTED':10} {r['code']:20} {r['name']}")
    for g in grpc_rows:
        say(f"  gRPC {g['code']:22} {g['name']}   {g['details'][:60]!r}")
    for name, reply in raw_grpc:
        say(f"  raw  {reply.status or '--- (' + reply.error + ')'!s:22} {name}")
    by_status = Counter(str(r["status"]) for r in rows)
    answered = [r for r in rows if r["json_error"] is not None]
    json_ok = sum(bool(r["json_error"]) for r in answered)
    server_errors = [r["name"] for r in rows if r["status"] is not None and r["status"] >= 500]
    grpc_bad = [g["name"] for g in grpc_rows if g["code"] in ("OK", "UNKNOWN", "INTERNAL")]
    tracebacks = [line.strip()[:200] for line in log if "Traceback" in line]
    errors = [line.strip()[:200] for line in log if '"level": "error"' in line or '"level": "critical"' in line]
    alive = health[0] == 200 and seg[0] == 200 and grpc_ok
    say(f"  HTTP answers by status: {dict(sorted(by_status.items()))}")
    say(f"  error bodies in the {{code, message}} form: {json_ok} of {len(answered)}")
    say(f"  as expected: {sum(r['expected'] for r in rows)} of {len(rows)}; 5xx answers: {server_errors or 'none'}")
    say(f"  gRPC answers OK/UNKNOWN/INTERNAL to garbage: {grpc_bad or 'none'}")
    say(f"  server log: {len(tracebacks)} traceback(s), {len(errors)} error line(s)")
    for line in (tracebacks + errors)[:5]:
        say(f"      {line}")
    say(f"  still answering afterwards (/healthz, HTTP segment, gRPC segment): {'yes' if alive else 'NO'}")
    return {
        "http": rows,
        "grpc": grpc_rows,
        "raw_grpc_port": [{"name": n, "status": r.status, "error": r.error} for n, r in raw_grpc],
        "by_status": dict(by_status),
        "json_error_bodies": f"{json_ok}/{len(answered)}",
        "server_errors": server_errors,
        "grpc_internal_or_ok": grpc_bad,
        "tracebacks": tracebacks,
        "error_lines": errors,
        "alive_after": alive,
    }


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("nuclick-bridge")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "bridge.cli"]


def _features(path: Path) -> list | None:
    try:
        return [f["geometry"] for f in json.loads(path.read_text())["features"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def phase_clients100(b: Bench) -> dict:
    a = b.args
    work = b.tmp / "clients"
    work.mkdir(exist_ok=True)
    crop, pts = b.scene.crop_with(a.client_clicks)
    png, csv = work / "crop.png", work / "clicks.csv"
    Image.fromarray(crop).save(png)
    csv.write_text("x,y\n" + "".join(f"{x:.1f},{y:.1f}\n" for x, y in pts))
    say(
        f"== clients100: {a.clients} 'nuclick-bridge segment --server' runs on a {crop.shape[1]}x{crop.shape[0]} "
        f"crop with {len(pts)} clicks"
    )
    env = dict(os.environ, NUCLICK_BRIDGE_TOKEN=b.token)

    def launch(k: int, target: str) -> tuple[subprocess.Popen, float]:
        cmd = [*_cli(), "segment", str(png), "--points", str(csv), "--out", str(work / f"out{k}.geojson")]
        cmd += ["--server", target]
        with open(work / f"err{k}.txt", "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        return proc, time.monotonic()

    with b.serve() as srv:
        b.warm(srv)
        # One run alone: its peak RSS decides how many fit at once.
        proc, t0 = launch(0, srv.grpc)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        one_s, one_mb = time.monotonic() - t0, usage.ru_maxrss / 1024
        reference = _features(work / "out0.geojson")
        avail = mem_available_mb()
        fit = int(a.memory_share * avail / max(one_mb, 1.0))
        in_flight = max(1, min(a.clients, fit))
        how = "all at once" if in_flight >= a.clients else f"{in_flight} at a time (a pool: memory allows no more)"
        say(
            f"  one run alone: exit {proc.returncode}, {one_s:.1f} s, peak RSS {one_mb:.0f} MB; "
            f"{avail / 1024:.1f} GiB available, {a.memory_share:.0%} of it fits {fit} -> {how}"
        )
        running: dict[int, tuple[subprocess.Popen, float]] = {}
        done: dict[int, dict] = {}
        pending = list(range(1, a.clients + 1))
        low_mem = avail
        peak_server = process_stats(srv.proc.pid)
        t_all = time.monotonic()
        while pending or running:
            while pending and len(running) < in_flight:
                k = pending.pop(0)
                running[k] = launch(k, srv.grpc)
            time.sleep(0.1)
            for k, (p, started) in list(running.items()):
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid == 0:
                    continue
                p.returncode = os.waitstatus_to_exitcode(status)
                done[k] = {"rc": p.returncode, "s": time.monotonic() - started, "rss_mb": usage.ru_maxrss / 1024}
                del running[k]
            low_mem = min(low_mem, mem_available_mb())
            stats = process_stats(srv.proc.pid)
            if stats["rss_mb"] > peak_server["rss_mb"]:
                peak_server = stats
            if time.monotonic() - t_all > a.clients_timeout:
                for p, _ in running.values():
                    p.kill()
                    p.wait(10)
                for k in running:
                    done[k] = {"rc": "killed (timeout)", "s": a.clients_timeout, "rss_mb": 0.0}
                running.clear()
                pending.clear()
        wall = time.monotonic() - t_all
    outcomes: Counter = Counter()
    same = 0
    examples: list[str] = []
    for k, d in sorted(done.items()):
        err = (work / f"err{k}.txt").read_text(errors="replace")
        if d["rc"] == 0:
            outcomes["exit 0"] += 1
            same += _features(work / f"out{k}.geojson") == reference
        elif any(w in err.lower() for w in CAPACITY_WORDS):
            outcomes["failed for capacity"] += 1
            examples.append(err.strip().splitlines()[-1][:160] if err.strip() else "")
        else:
            outcomes[f"failed (exit {d['rc']})"] += 1
            examples.append(err.strip().splitlines()[-1][:160] if err.strip() else "")
    runs = [d["s"] for d in done.values()]
    rss = [d["rss_mb"] for d in done.values() if d["rss_mb"]]
    say(f"  {a.clients} runs in {wall:.1f} s: {dict(outcomes)}; outputs identical to the lone run: {same}")
    if runs:
        say(
            f"  per run: p50 {np.percentile(runs, 50):.1f} s, max {max(runs):.1f} s; peak RSS per run "
            f"max {max(rss or [0]):.0f} MB; lowest MemAvailable {low_mem / 1024:.1f} GiB; "
            f"server peak RSS {peak_server['rss_mb']:.0f} MB, threads {peak_server['threads']}"
        )
    for line in examples[:5]:
        say(f"      {line}")
    return {
        "runs": a.clients,
        "clicks": len(pts),
        "crop": list(crop.shape[:2]),
        "one_run": {"exit": proc.returncode, "s": round(one_s, 2), "peak_rss_mb": round(one_mb, 1)},
        "in_flight": in_flight,
        "all_at_once": in_flight >= a.clients,
        "wall_s": round(wall, 2),
        "outcomes": dict(outcomes),
        "identical_outputs": same,
        "run_s_p50": round(float(np.percentile(runs, 50)), 2) if runs else None,
        "run_s_max": round(max(runs), 2) if runs else None,
        "lowest_mem_available_mb": round(low_mem),
        "server_peak": peak_server,
        "failure_examples": examples[:10],
    }


def phase_soak(b: Bench) -> dict:
    a = b.args
    seconds = a.soak_minutes * 60
    say(
        f"== soak: {a.soak_clients} clients for {a.soak_minutes:g} min, gRPC and HTTP tiles alternating "
        f"(1 to 4 clicks, {a.tile} to {2 * a.tile} px), a line every {a.soak_window:g} s"
    )
    tiles = b.scene.tiles(a.tile, 24, max_clicks=4, seed=2) + b.scene.tiles(2 * a.tile, 8, max_clicks=4, seed=3)
    bodies = [t.json_body() for t in tiles]
    records: list[tuple[float, float, bool, str]] = []  # (end time, ms, ok, transport)
    failures: list[str] = []
    windows = []
    with b.serve() as srv:
        port, pid = http_port(srv), srv.proc.pid
        b.warm(srv)
        start = time.monotonic()
        end = start + seconds

        def client_loop(k: int) -> None:
            client = NuClickClient(srv.grpc, token=b.token)
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {b.token}"}
            i = 0
            while time.monotonic() < end:
                j = (k * 7 + i) % len(tiles)
                transport = "grpc" if (i + k) % 2 == 0 else "http"
                t0 = time.perf_counter()
                ok = False
                try:
                    if transport == "grpc":
                        ok = len(client.segment(tiles[j].pixels, tiles[j].clicks, origin=tiles[j].origin)) == len(
                            tiles[j].clicks
                        )
                    else:
                        conn.request("POST", "/v1/segment", bodies[j], headers)
                        resp = conn.getresponse()
                        data = resp.read()
                        ok = resp.status == 200 and len(json.loads(data)["results"]) == len(tiles[j].clicks)
                        if not ok:
                            failures.append(f"http {resp.status}: {data[:120]!r}")
                except Exception as exc:
                    failures.append(f"{transport} {type(exc).__name__}: {str(exc)[:120]}")
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, port, timeout=60)
                records.append((time.monotonic(), 1000 * (time.perf_counter() - t0), ok, transport))
                i += 1
            client.close()
            conn.close()

        threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(a.soak_clients)]
        for t in threads:
            t.start()
        seen = 0
        w_start = start
        while w_start < end - 1e-6:
            w_end = min(w_start + a.soak_window, end)
            time.sleep(max(0.0, w_end - time.monotonic()))
            if w_end >= end:
                for t in threads:
                    t.join(120)
            now = len(records)
            chunk = records[seen:now]
            seen = now
            stats = process_stats(pid)
            ms = [r[1] for r in chunk if r[2]]
            w = {
                "t_s": round(w_end - start, 1),
                "requests": len(chunk),
                "failures": sum(not r[2] for r in chunk),
                **summary(ms),
                "server_rss_mb": stats["rss_mb"],
                "server_threads": stats["threads"],
            }
            windows.append(w)
            total_fail = sum(not r[2] for r in records[:now])
            say(
                f"  t={w['t_s']:6.0f} s  requests {now:6d} (+{len(chunk)})  failures {total_fail}  "
                f"window p50 {w.get('p50_ms', float('nan')):6.1f} ms p95 {w.get('p95_ms', float('nan')):6.1f} ms  "
                f"server RSS {stats['rss_mb']:.0f} MB, threads {stats['threads']}"
            )
            w_start = w_end
    total = len(records)
    fails = sum(not r[2] for r in records)
    by_transport = Counter(r[3] for r in records)
    growth = windows[-1]["server_rss_mb"] - windows[0]["server_rss_mb"] if windows else 0.0
    rate = total / seconds if seconds else 0.0
    say(
        f"  total {total} requests ({dict(by_transport)}), {rate:.1f}/s; failures {fails} -> "
        f"{'none' if fails == 0 else 'SOME FAILED'}; all: {show(summary([r[1] for r in records if r[2]]))}"
    )
    say(
        f"  server RSS first window {windows[0]['server_rss_mb'] if windows else 0:.0f} MB, last "
        f"{windows[-1]['server_rss_mb'] if windows else 0:.0f} MB: growth {growth:+.1f} MB"
    )
    for line in failures[:5]:
        say(f"      {line}")
    return {
        "clients": a.soak_clients,
        "minutes": a.soak_minutes,
        "requests": total,
        "by_transport": dict(by_transport),
        "failures": fails,
        "no_failures": fails == 0,
        "latency": summary([r[1] for r in records if r[2]]),
        "windows": windows,
        "rss_growth_mb": round(growth, 1),
        "failure_examples": failures[:20],
    }


def phase_latency(b: Bench) -> dict:
    a = b.args
    rev = a.baseline
    say(
        f"== latency: single click, this checkout against {rev} (served from a git worktree), "
        f"{a.latency_requests} of each after {a.latency_warmup} warm-up, alternating"
    )
    worktree = b.tmp / f"baseline-{rev}"
    made = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), rev], capture_output=True, text=True
    )
    if made.returncode != 0:
        say(f"  cannot make a worktree of {rev}: {made.stderr.strip()}")
        return {"error": made.stderr.strip()}
    servers: dict[str, ServeProcess] = {}
    try:
        with launched_from(worktree):
            where = subprocess.run(
                [sys.executable, "-c", "import bridge; print(bridge.__file__)"], capture_output=True, text=True
            ).stdout.strip()
            servers["baseline"] = b.serve()
        servers["current"] = b.serve()
        say(f"  baseline imports {where}")
        if not where.startswith(str(worktree)):
            say("  the baseline does not import its own bridge: its figures are not the baseline's")
        tile = b.scene.tiles(256, 1, seed=5)[0]
        body = tile.json_body()
        clients = {k: NuClickClient(s.grpc, token=b.token) for k, s in servers.items()}
        conns = {k: http.client.HTTPConnection(HOST, http_port(s), timeout=60) for k, s in servers.items()}
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {b.token}"}
        ms: dict[str, list[float]] = {f"{k} {t}": [] for k in servers for t in ("http", "grpc")}
        errors: Counter = Counter()
        for i in range(a.latency_warmup + a.latency_requests):
            order = ("current", "baseline") if i % 2 == 0 else ("baseline", "current")
            for k in order:
                t0 = time.perf_counter()
                conns[k].request("POST", "/v1/segment", body, headers)
                resp = conns[k].getresponse()
                resp.read()
                t1 = time.perf_counter()
                try:
                    clients[k].segment(tile.pixels, tile.clicks, origin=tile.origin)
                except Exception as exc:
                    errors[f"{k} grpc {type(exc).__name__}"] += 1
                t2 = time.perf_counter()
                if resp.status != 200:
                    errors[f"{k} http {resp.status}"] += 1
                if i >= a.latency_warmup:
                    ms[f"{k} http"].append(1000 * (t1 - t0))
                    ms[f"{k} grpc"].append(1000 * (t2 - t1))
        for c in clients.values():
            c.close()
        for c in conns.values():
            c.close()
        rss = {k: process_stats(s.proc.pid)["rss_mb"] for k, s in servers.items()}
    finally:
        for s in servers.values():
            s.kill()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
    figures = {k: summary(v) for k, v in ms.items()}
    for k, f in figures.items():
        say(f"  {k:14} {show(f)}")
    ratios = {}
    for t in ("http", "grpc"):
        new, old = figures[f"current {t}"], figures[f"baseline {t}"]
        if new.get("n") and old.get("n"):
            ratios[t] = {q: round(new[q] / old[q], 3) for q in ("p50_ms", "p95_ms")}
            say(f"  {t}: current / baseline  p50 x{ratios[t]['p50_ms']:.3f}  p95 x{ratios[t]['p95_ms']:.3f}")
    say(
        f"  errors: {dict(errors) or 'none'}; idle RSS current {rss['current']:.0f} MB, "
        f"baseline {rss['baseline']:.0f} MB"
    )
    say(f"  worktree removed: {not worktree.exists()}")
    return {
        "baseline": rev,
        "baseline_imports": where,
        "figures": figures,
        "ratio_current_over_baseline": ratios,
        "errors": dict(errors),
        "rss_mb": rss,
    }


# -------------------------------------------------------------------- main


def header(args) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    bf16 = bool(re.search(r"\bavx512_bf16\b", cpuinfo))
    try:
        import torch

        from bridge.model.precision import resolve_precision

        precision = resolve_precision(args.precision, torch.device("cpu"))
    except Exception as exc:  # a client-only install: say what was asked for
        precision = f"{args.precision} (not resolved: {type(exc).__name__})"
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True
    )
    out = {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "avx512_bf16": bf16,
        "precision": precision,
        "threads_flag": args.threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "revision": rev.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else ""),
    }
    say(
        f"# {model}; {out['cores']} cores ({out['usable_cores']} usable); avx512_bf16 "
        f"{'present' if bf16 else 'absent'}; precision {precision}; serve --threads {args.threads or 'default'}; "
        f"OMP_NUM_THREADS={out['omp_num_threads']}"
    )
    say(f"# revision {out['revision']}; load average {out['load_average']}")
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--image", default=IMAGE, help="MoNuSeg image the tiles come from (default: %(default)s)")
    ap.add_argument("--weights", default=None, help="weights file (default: the shipped weights)")
    ap.add_argument("--precision", default="auto", help="serve --precision (default: auto)")
    ap.add_argument("--threads", type=int, default=0, help="serve --threads (default: 0, torch's default)")
    ap.add_argument("--serve-flag", action="append", default=[], help="extra flag for every serve (repeatable)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated, of: " + ", ".join(PHASES))
    ap.add_argument("--json", default=None, metavar="FILE", help="write the figures here (after every phase)")
    ap.add_argument("--tile", type=int, default=128, help="side of the small tiles in px (default: 128)")
    g = ap.add_argument_group("stalled")
    g.add_argument("--stall-body", type=int, default=100, help="connections stalled in their body (default: 100)")
    g.add_argument("--stall-trickle", type=int, default=100, help="connections trickling their head (default: 100)")
    g.add_argument("--trickle-interval", type=float, default=2.0, help="seconds between trickled bytes (default: 2)")
    g.add_argument("--stall-samples", type=int, default=20, help="calls of each kind measured (default: 20)")
    g.add_argument("--stall-gap", type=float, default=0.5, help="seconds between measured pairs (default: 0.5)")
    g.add_argument("--target-ms", type=float, default=1000.0, help="the answer-time target (default: 1000)")
    g = ap.add_argument_group("idle")
    g.add_argument("--idle", type=int, default=200, help="idle connections (default: 200)")
    g.add_argument("--idle-hold", type=float, default=12.0, help="seconds to hold them (default: 12)")
    g = ap.add_argument_group("burst")
    g.add_argument("--burst-grpc", type=int, default=300, help="concurrent gRPC calls (default: 300)")
    g.add_argument("--burst-http", type=int, default=300, help="concurrent HTTP calls (default: 300)")
    g.add_argument("--burst-workers", type=int, default=4, help="serve --workers (default: 4)")
    g.add_argument("--burst-queue", type=int, default=16, help="serve --queue (default: 16)")
    g.add_argument("--burst-streams", type=int, default=2, help="serve --max-streams, under --workers (default: 2)")
    g.add_argument("--burst-deadline", type=float, default=120.0, help="each call's deadline in s (default: 120)")
    g = ap.add_argument_group("malformed")
    g.add_argument("--malformed-timeout", type=float, default=5.0, help="seconds to wait for each answer")
    g = ap.add_argument_group("clients100")
    g.add_argument("--clients", type=int, default=100, help="segment --server runs (default: 100)")
    g.add_argument("--client-clicks", type=int, default=50, help="clicks in the crop (default: 50)")
    g.add_argument("--memory-share", type=float, default=0.5, help="share of MemAvailable the runs may take")
    g.add_argument("--clients-timeout", type=float, default=900.0, help="seconds before the rest are killed")
    g = ap.add_argument_group("soak")
    g.add_argument("--soak-clients", type=int, default=8, help="clients (default: 8)")
    g.add_argument("--soak-minutes", type=float, default=10.0, help="minutes (default: 10)")
    g.add_argument("--soak-window", type=float, default=30.0, help="seconds per printed window (default: 30)")
    g = ap.add_argument_group("latency")
    g.add_argument("--baseline", default="9b50ade", help="revision to compare with (default: %(default)s)")
    g.add_argument("--latency-requests", type=int, default=200, help="measured requests of each kind (default: 200)")
    g.add_argument("--latency-warmup", type=int, default=20, help="warm-up requests (default: 20)")
    args = ap.parse_args(argv)
    args.phase_list = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in args.phase_list if p not in PHASES]
    if unknown:
        ap.error(f"unknown phase(s) {', '.join(unknown)}; the phases are {', '.join(PHASES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out: dict = {"header": header(args), "args": {k: v for k, v in vars(args).items() if k != "phase_list"}}
    out["phases"] = {}
    bench = Bench(args)
    run = {
        "stalled": phase_stalled,
        "idle": phase_idle,
        "burst": phase_burst,
        "malformed": phase_malformed,
        "clients100": phase_clients100,
        "soak": phase_soak,
        "latency": phase_latency,
    }
    try:
        for name in args.phase_list:
            t0 = time.monotonic()
            try:
                out["phases"][name] = run[name](bench)
            except Exception as exc:  # one phase failing leaves the others' figures
                say(f"  phase {name} stopped: {type(exc).__name__}: {exc}")
                out["phases"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            out["phases"][name]["phase_s"] = round(time.monotonic() - t0, 1)
            say(f"  ({name}: {time.monotonic() - t0:.0f} s)")
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
