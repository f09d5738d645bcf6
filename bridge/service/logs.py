"""Structured logs for the server: one JSON object per line on stderr.

Events carry their fields in ``extra={"fields": {...}}`` (see
:func:`bridge.service.core.log_event`); the JSON formatter merges them into
the line, the text formatter appends them as ``key=value``.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import logging
import os
import re
import select
import sys
import threading
import time


def clip(text: str | None, limit: int = 128) -> str | None:
    """``text`` cut to ``limit`` characters (with a mark and the full length):
    client-chosen strings (request ids, model names) must not make log lines
    as long as the client likes."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} chars)"


class Throttle:
    """At most one log line per ``interval`` seconds for each key.

    Why: refusals and failed logins come in floods (a busy server refuses
    hundreds a second, a scanner guesses tokens); one line per second says
    that it happens, and the line after a quiet spell says how many were left
    out (``suppressed``).  Exact counts live in the metrics.  ``clock`` is
    there for tests.
    """

    def __init__(self, interval: float = 1.0, clock=time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, logger: logging.Logger, key: str, msg: str, level: int = logging.WARNING, **fields) -> bool:
        """Log ``msg`` with ``fields`` unless a line with this key went out less
        than ``interval`` ago; True when the line was written."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        logger.log(level, msg, extra={"fields": fields})
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            doc.update({k: v for k, v in fields.items() if v is not None})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return line


# gRPC core (C++) logs through absl to file descriptor 2, e.g.
#   I1129 02:32:45.307935   11349 ssl_transport_security.cc:2563] Handshake failed with error ...
_NATIVE_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([\w./-]+:\d+)\] ?(.*)$")
_NATIVE_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_PEER = re.compile(r"endpoint_peer_address=([^,}\s]+)")
_HANDSHAKE_ERROR = re.compile(r"CallNextHandshakerLocked: error=(.*?)(?:: OK)?\s*(?:===|shutdown=|$)", re.S)


def native_event(source: str, text: str) -> tuple[str, dict] | None:
    """What one gRPC core log record means for our log: ``(msg, fields)``, or
    None to drop it.

    gRPC Python has no hook for a failed TLS handshake: the server never sees
    the connection.  Its ``handshaker`` tracer is the only place that names
    the peer, in the record of the step that failed; that record becomes one
    "tls handshake failed" event.  The tracer's other records (every
    successful step) and gRPC's own peer-less "Handshake failed" line, which
    the traced record repeats, are dropped.
    """
    if source.startswith("handshaker.cc") or source.startswith("channel_trace.h"):
        found = _HANDSHAKE_ERROR.search(text) if "CallNextHandshakerLocked: error=" in text else None
        if found is None or found.group(1).startswith("OK"):
            return None
        peer = _PEER.search(text)
        reason = " ".join(found.group(1).split())
        return "tls handshake failed", {"port": "grpc", "peer": peer.group(1) if peer else None, "reason": reason}
    if source.startswith("ssl_transport_security.cc") and text.startswith("Handshake failed"):
        return None
    if source.startswith("trace.cc") and text.startswith("gRPC Tracers:"):
        return None
    return " ".join(text.split()), {"source": source}


class NativeStderr:
    """File descriptor 2 turned into log records, one JSON line each.

    Why: C libraries (gRPC core above all) and Python's last-resort printing
    (uncaught exceptions in threads, warnings) write straight to fd 2, around
    any Python handler, so a server whose log promises one JSON object per
    line must own fd 2.  A pipe takes its place; a thread reads it, groups the
    continuation lines of a gRPC record with their head, and logs each record
    through ``logging`` (gRPC's records under the "grpc" logger, anything else
    under "stderr").  The real stderr stays available as :attr:`stream` for
    the log handler itself.
    """

    def __init__(self) -> None:
        self._saved = os.dup(2)
        self.stream = os.fdopen(os.dup(self._saved), "w", buffering=1, encoding="utf-8", errors="replace")
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._read = read
        self._thread = threading.Thread(target=self._pump, name="native-stderr", daemon=True)
        self._thread.start()
        # A crash (segfault, abort) kills the pump with the process: its dump goes to the real stderr.
        faulthandler.enable(file=self.stream)

    def _pump(self) -> None:
        pending: list[str] = []
        buf = b""
        while True:
            ready, _, _ = select.select([self._read], [], [], 0.2)
            if not ready:  # quiet: a record with no continuation is complete
                self._emit(pending)
                pending = []
                continue
            chunk = os.read(self._read, 65536)
            if not chunk:
                self._emit(pending)
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                if _NATIVE_LINE.match(line) or line.startswith("{") or line.startswith("Traceback"):
                    self._emit(pending)
                    pending = [line]
                elif pending:
                    pending.append(line)
                elif line.strip():
                    pending = [line]

    def _emit(self, lines: list[str]) -> None:
        if not lines:
            return
        head = _NATIVE_LINE.match(lines[0])
        try:
            if head is None:
                text = "\n".join(lines)
                if text.startswith("{"):  # already one of our JSON lines (a handler writing to fd 2)
                    self.stream.write(text + "\n")
                    return
                logging.getLogger("stderr").warning(text.strip())
                return
            level = _NATIVE_LEVELS[head.group(1)]
            event = native_event(head.group(2), "\n".join([head.group(3), *lines[1:]]))
            if event is None:
                return
            msg, fields = event
            if msg == "tls handshake failed":
                level = logging.WARNING
            elif level < _grpc_min_level or msg.startswith("Log level INFO is not suitable"):
                return  # below the user's GRPC_VERBOSITY, or gRPC remarking on the INFO we set
            logging.getLogger("grpc").log(level, msg, extra={"fields": fields})
        except Exception:  # pragma: no cover - a log line must never kill the pump
            pass

    def close(self) -> None:
        """Give fd 2 back; the pipe then ends and the last records are logged."""
        if self._saved < 0:
            return
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = -1
        self._thread.join(2)


def trace_handshakes() -> None:
    """Turn on gRPC's ``handshaker`` tracer, the only source of the peer of a
    failed TLS handshake, before gRPC core starts (it reads the environment
    once).  Its records reach the log only as :func:`native_event` makes them."""
    traces = [t for t in os.environ.get("GRPC_TRACE", "").split(",") if t]
    if "handshaker" not in traces and "all" not in traces:
        os.environ["GRPC_TRACE"] = ",".join([*traces, "handshaker"])
    # Tracer records are INFO, so gRPC must print INFO; the level the user asked
    # for (GRPC_VERBOSITY, gRPC's default ERROR) still filters gRPC's other lines.
    global _grpc_min_level
    asked = os.environ.get("GRPC_VERBOSITY", "ERROR").upper()
    _grpc_min_level = _VERBOSITY.get(asked, logging.ERROR)
    os.environ["GRPC_VERBOSITY"] = "INFO"


_native: NativeStderr | None = None
_VERBOSITY = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "ERROR": logging.ERROR, "NONE": logging.CRITICAL + 1}
_grpc_min_level = logging.ERROR


def configure(fmt: str = "json", level: int = logging.INFO, native: bool = True) -> None:
    """Route every log record through one stderr handler in ``fmt``.

    ``native``: also route what C libraries and Python itself write to file
    descriptor 2 (gRPC core's lines, failed TLS handshakes with their peer,
    tracebacks) into the log (:class:`NativeStderr`); the ``serve`` command's
    default, so that its stderr is one JSON object per line.
    """
    global _native
    stream = sys.stderr
    if native and os.name == "posix":
        trace_handshakes()
        if _native is None:
            _native = NativeStderr()
            atexit.register(_native.close)  # the last records reach the log before exit
        stream = _native.stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
