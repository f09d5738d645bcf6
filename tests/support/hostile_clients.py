"""Clients that misbehave on purpose, for benchmarks/hostile.py: connections
that stall in their body or trickle their request head, raw requests that
break HTTP in about thirty ways, and reading an answer off a raw socket.
Loopback only; every wait is bounded."""

from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


# ----------------------------------------------------------------- answers


@dataclass
class RawReply:
    """What came back on a raw connection: ``status`` None when the server
    closed it (or ``timeout`` passed) without an answer; ``error`` says which."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str = ""

    def json_error(self) -> bool:
        """Whether the body is the gateway's error form, exactly ``{"code", "message"}`` with text in both."""
        try:
            doc = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return False
        return (
            isinstance(doc, dict)
            and set(doc) == {"code", "message"}
            and all(isinstance(doc[k], str) and doc[k] for k in doc)
        )

    def code(self) -> str:
        """The error body's ``code`` ('' when there is none)."""
        try:
            doc = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return ""
        return str(doc.get("code", "")) if isinstance(doc, dict) else ""


def _parse(data: bytes) -> tuple[int | None, dict[str, str], bytes, bool]:
    """(status, headers, body so far, whether the body is complete) of the bytes read so far."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None, {}, b"", False
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        return None, {}, b"", True
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        return status, headers, rest[:n], len(rest) >= n
    return status, headers, rest, False  # until the server closes


def read_reply(sock: socket.socket, timeout: float) -> RawReply:
    """One HTTP response off ``sock``, within ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    data = b""
    error = ""
    while True:
        status, headers, body, complete = _parse(data)
        if complete:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            error = "timeout"
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            error = "timeout"
            break
        except OSError as exc:  # reset: the server closed with our bytes unread
            error = type(exc).__name__
            break
        if not chunk:
            error = "closed"
            break
        data += chunk
    status, headers, body, _ = _parse(data)
    if status is None and not error:
        error = "not HTTP: " + repr(data[:40])
    return RawReply(status, headers, body, "" if status is not None else error)


def exchange(port: int, data: bytes, timeout: float = 5.0, half_close: bool = False) -> RawReply:
    """Send ``data`` on a fresh connection and read one answer.  ``half_close``
    ends our side after sending (a body that stops short, then nothing)."""
    try:
        sock = socket.create_connection((HOST, port), timeout=timeout)
    except OSError as exc:
        return RawReply(None, error=f"connect: {type(exc).__name__}")
    with sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before it had everything: read what it said
        return read_reply(sock, timeout)


# ------------------------------------------------------- the server's costs


def process_stats(pid: int) -> dict[str, float]:
    """Threads, resident memory (MiB) and open file descriptors of a process on this machine."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Threads":
            out["threads"] = int(value)
        elif key == "VmRSS":
            out["rss_mb"] = round(int(value.split()[0]) / 1024, 1)
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        out["fds"] = float("nan")
    return out


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------ stalled and trickling


STALL_HEAD = (
    b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
)
TRICKLE_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "


class Stallers:
    """``n_body`` connections without a token that send a ``POST /v1/segment``
    head declaring 100000 bytes and one byte of body, then nothing; ``n_trickle``
    that send one byte of a request head that never ends every ``interval``
    seconds.  A connection the server closes is opened again (and counted), so
    that the count holds for as long as they run.  One thread drives them all."""

    def __init__(self, port: int, n_body: int, n_trickle: int, interval: float = 2.0) -> None:
        self.port = port
        self.n_body, self.n_trickle, self.interval = n_body, n_trickle, interval
        self._sel = selectors.DefaultSelector()
        self._socks: dict[socket.socket, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stallers", daemon=True)
        self.closed_by_server = 0
        self.connect_failures = 0
        self.answers: Counter[str] = Counter()  # status lines sent to the stalled connections
        self.trickled_bytes = 0

    def _open(self, kind: str) -> None:
        try:
            s = socket.create_connection((HOST, self.port), timeout=5)
            s.sendall(STALL_HEAD if kind == "body" else TRICKLE_HEAD[:1])
        except OSError:
            self.connect_failures += 1
            return
        s.setblocking(False)
        self._socks[s] = {"kind": kind, "sent": 1}
        self._sel.register(s, selectors.EVENT_READ)

    def _drop(self, s: socket.socket) -> str:
        kind = self._socks.pop(s)["kind"]
        self._sel.unregister(s)
        s.close()
        return kind

    def start(self) -> Stallers:
        for _ in range(self.n_body):
            self._open("body")
        for _ in range(self.n_trickle):
            self._open("trickle")
        self._thread.start()
        return self

    def open_now(self) -> dict[str, int]:
        kinds = Counter(info["kind"] for info in list(self._socks.values()))
        return {"body": kinds["body"], "trickle": kinds["trickle"]}

    def _run(self) -> None:
        next_tick = time.monotonic() + self.interval
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=max(0.0, min(0.2, next_tick - time.monotonic()))):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    if data.startswith(b"HTTP/1.1 "):
                        self.answers[data[9:12].decode("latin-1")] += 1
                    continue  # an answer on the connection; it stays open until the server closes it
                self.closed_by_server += 1
                self._open(self._drop(s))
            if time.monotonic() >= next_tick:
                next_tick += self.interval
                for s, info in list(self._socks.items()):
                    if info["kind"] != "trickle":
                        continue
                    k = info["sent"]
                    byte = TRICKLE_HEAD[k : k + 1] or b"a"
                    try:
                        s.send(byte)
                        info["sent"] += 1
                        self.trickled_bytes += 1
                    except OSError:
                        pass  # closed: the select above sees it

    def stats(self) -> dict:
        return {
            "open": self.open_now(),
            "closed_by_server": self.closed_by_server,
            "connect_failures": self.connect_failures,
            "answers_to_stalled": dict(self.answers),
            "trickled_bytes": self.trickled_bytes,
        }

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for s in list(self._socks):
            self._drop(s)
        self._sel.close()


# -------------------------------------------------------- malformed requests


@dataclass(frozen=True)
class Malformed:
    """One broken request: its bytes, the statuses a careful server answers it
    with (empty: closing it unanswered is right too), and whether to end our
    side of the connection after sending."""

    name: str
    data: bytes
    expect: tuple[int, ...]
    half_close: bool = False


def _req(method: str, path: str, body: bytes | None = None, token: str | None = None, extra: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode()
    if token:
        head += f"Authorization: Bearer {token}\r\n".encode()
    if body is not None:
        head += b"Content-Type: application/json\r\n" + f"Content-Length: {len(body)}\r\n".encode()
    return head + extra + b"Connection: close\r\n\r\n" + (body or b"")


def malformed_requests(token: str, good_body: bytes) -> list[Malformed]:
    """About thirty requests that break HTTP, the gateway's framing rules, the
    JSON or the message, each on its own connection.  ``good_body`` is a valid
    SegmentRequest in JSON (some cases spoil it)."""
    T = token
    seg = "/v1/segment"
    cases = [
        Malformed("garbage request line", b"GARBAGE\r\n\r\n", (400,)),
        Malformed("request line of spaces", b"   \r\n\r\n", (400,)),
        Malformed("HTTP/9.9", b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", (400, 505)),
        Malformed("HTTP/0.9 request line", b"GET /healthz\r\n\r\n", (400,)),
        Malformed("binary junk", bytes(range(256)) * 2 + b"\r\n\r\n", (400,)),
        Malformed(
            "TLS ClientHello on the plain port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\0" * 160, (400,)
        ),
        Malformed(
            "header line without a colon", b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", (400,)
        ),
        Malformed("space before a header's colon", b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", (400,)),
        Malformed("NUL in a header value", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n", (400,)),
        Malformed(
            "one header of 70 kB (heads are limited to 64 kB)",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
            (400, 431),
        ),
        Malformed(
            "500 headers (100 kB)",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: %s\r\n" % (k, b"b" * 190) for k in range(500))
            + b"\r\n",
            (400, 431),
        ),
        Malformed(
            "one header of 1 MB",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
            (400, 431),
        ),
        Malformed("URL of 100 kB", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", (400, 414)),
        Malformed("HTTP/1.1 without Host", b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n", (400,)),
        Malformed("Content-Length: abc", _req("POST", seg, token=T, extra=b"Content-Length: abc\r\n"), (400,)),
        Malformed("Content-Length: -5", _req("POST", seg, token=T, extra=b"Content-Length: -5\r\n"), (400,)),
        Malformed(
            "two different Content-Lengths",
            _req("POST", seg, token=T, extra=b"Content-Length: 1\r\nContent-Length: 2\r\n") + b"{}",
            (400,),
        ),
        Malformed(
            "Content-Length and chunked together",
            _req("POST", seg, token=T, extra=b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n") + b"0\r\n\r\n",
            (400, 411),
        ),
        Malformed(
            "chunked body",
            _req("POST", seg, token=T, extra=b"Transfer-Encoding: chunked\r\n") + b"2\r\n{}\r\n0\r\n\r\n",
            (411,),
        ),
        Malformed(
            "Transfer-Encoding: gzip",
            _req("POST", seg, token=T, extra=b"Transfer-Encoding: gzip\r\n") + b"{}",
            (400, 501),
        ),
        Malformed(
            "Content-Length of 10^20",
            _req("POST", seg, token=T, extra=b"Content-Length: 100000000000000000000\r\n"),
            (400, 413),
        ),
        Malformed("body of 70 MB declared", _req("POST", seg, token=T, extra=b"Content-Length: 73400320\r\n"), (413,)),
        Malformed(
            "body shorter than declared, then EOF",
            _req("POST", seg, token=T, extra=b"Content-Length: 100\r\n") + b"{}",
            (),
            half_close=True,
        ),
        Malformed("empty body", _req("POST", seg, b"", token=T), (400,)),
        Malformed("bad JSON", _req("POST", seg, b'{"tile": ', token=T), (400,)),
        Malformed("JSON that is a list", _req("POST", seg, b"[1, 2, 3]", token=T), (400,)),
        Malformed("JSON nested 100000 deep", _req("POST", seg, b"[" * 100_000 + b"]" * 100_000, token=T), (400,)),
        Malformed("tile of the wrong type", _req("POST", seg, b'{"tile": "a tile", "clicks": []}', token=T), (400,)),
        Malformed("click x as text", _req("POST", seg, _spoil(good_body, "x", "left"), token=T), (400,)),
        Malformed("click x NaN", _req("POST", seg, _spoil(good_body, "x", "NaN"), token=T), (400,)),
        Malformed(
            "tile data not base64", _req("POST", seg, _spoil_tile(good_body, data="***not base64***"), token=T), (400,)
        ),
        Malformed(
            "tile 100000 px wide, 10 bytes",
            _req("POST", seg, _spoil_tile(good_body, width=100000), token=T),
            (400, 413),
        ),
        Malformed("unknown field", _req("POST", seg, b'{"tile": {}, "noSuchField": 1}', token=T), (400,)),
        Malformed("not UTF-8", _req("POST", seg, b'{"requestId": "\xff\xfe"}', token=T), (400,)),
        Malformed("no token", _req("POST", seg, good_body), (401,)),
        Malformed("wrong token", _req("POST", seg, good_body, token="wrong-token"), (401,)),
        Malformed(
            "Basic credentials", _req("POST", seg, good_body, extra=b"Authorization: Basic dXNlcjpwYXNz\r\n"), (401,)
        ),
        Malformed("PATCH /v1/segment", _req("PATCH", seg, b"{}", token=T), (405,)),
        Malformed("PUT /v1/segment", _req("PUT", seg, b"{}", token=T), (405,)),
        Malformed("DELETE /v1/model", _req("DELETE", "/v1/model", token=T), (405,)),
        Malformed("TRACE /healthz", _req("TRACE", "/healthz"), (405,)),
        Malformed("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", (400, 404, 405)),
        Malformed("unknown route", _req("GET", "/v2/anything", token=T), (404,)),
        Malformed("path traversal", _req("GET", "/../../etc/passwd", token=T), (400, 404)),
        Malformed("percent-encoded NUL in the path", _req("GET", "/healthz%00", token=T), (400, 404)),
        Malformed(
            "bad line in a stream", _req("POST", "/v1/segmentStream", good_body + b"\n{oops\n", token=T), (200, 400)
        ),
    ]
    return cases


def _spoil(body: bytes, key: str, value) -> bytes:
    doc = json.loads(body)
    doc["clicks"][0][key] = value
    return json.dumps(doc).encode()


def _spoil_tile(body: bytes, **changes) -> bytes:
    doc = json.loads(body)
    doc["tile"].update(changes)
    if "width" in changes:
        doc["tile"]["data"] = "AAAAAAAAAAAAAA=="
    return json.dumps(doc).encode()
