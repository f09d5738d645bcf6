"""Prometheus metrics of one server, served as ``GET /metrics`` on the HTTP port.

Every server has its own :class:`prometheus_client.CollectorRegistry` (not the
process-wide default), so that several servers in one process (tests,
embedders) count apart.  Names:

- ``nuclick_requests_total{method,code}``: calls by method (``Segment``,
  ``SegmentStream`` per tile, ``GetModelInfo``) and gRPC status name.
- ``nuclick_clicks_total``: clicks answered (context-only clicks excluded), so
  that over the replicas of a run the counters add up to the run's clicks.
- ``nuclick_nuclei_found_total``: of those, how many got a nucleus.
- ``nuclick_request_duration_seconds{method}``: latency histogram.
- ``nuclick_batch_size``: patches per network batch (histogram).
- ``nuclick_queue_depth``: chunks of patches waiting for the network.
- ``nuclick_requests_in_flight``: segment calls accepted and not yet answered
  (computing, or waiting for a compute slot); refused calls never count.
- ``nuclick_calls_waiting``: of those, unary calls waiting for a compute slot
  (the admission queue of ``serve --queue``).
- ``nuclick_refused_total{reason}``: calls refused before any work:
  ``queue_full`` (busy: the queue was full), ``shutting_down`` (draining),
  ``streams_full`` (no stream slot free).  Refused unary calls also count in
  ``nuclick_requests_total`` under their status (RESOURCE_EXHAUSTED,
  UNAVAILABLE); refused streams only here.
- ``nuclick_stream_idle_timeouts_total``: streams ended because their client
  sent nothing for ``serve --stream-idle-timeout`` seconds.
- ``nuclick_auth_failures_total{port,reason}``: calls refused for their token,
  by port (``grpc``, ``http``) and reason (``missing``, ``wrong``).
- ``nuclick_model_info{model,version,device}``: 1, for joining the rest on
  (the default model: what a request that names none gets).
- ``nuclick_served_model_info{name,model,version}``: 1 per model served now,
  by the name requests ask for it by (``SegmentRequest.model_name``).
- ``nuclick_model_requests_total{name,code}``: segment calls (unary and per
  stream tile) by the served model they named and gRPC status; calls naming
  no model count under ``default``, calls naming an unknown one not at all.
- ``nuclick_model_reloads_total{result}``: re-reads of ``--models-dir``
  (``ok`` or ``failed``; a failed one changed nothing).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bridge.service.logs import Throttle

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """The counters, histograms and gauges of one :class:`SegmentService`."""

    def __init__(self) -> None:
        # The log lines that go with the refusal and failed-login counters are
        # rate-limited per server, as the counters are per server.
        self.throttle = Throttle(1.0)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "nuclick_requests", "Calls answered, by method and gRPC status", ["method", "code"], registry=r
        )
        self.clicks = Counter("nuclick_clicks", "Clicks answered (context-only clicks excluded)", registry=r)
        self.nuclei = Counter("nuclick_nuclei_found", "Clicks answered with a nucleus", registry=r)
        self.latency = Histogram(
            "nuclick_request_duration_seconds",
            "Time to answer a call, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "nuclick_batch_size", "Patches per network batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("nuclick_queue_depth", "Chunks of patches waiting for the network", registry=r)
        self.in_flight = Gauge("nuclick_requests_in_flight", "Segment calls accepted and not yet answered", registry=r)
        self.waiting = Gauge("nuclick_calls_waiting", "Unary calls waiting for a compute slot", registry=r)
        self.refused = Counter("nuclick_refused", "Calls refused before any work, by reason", ["reason"], registry=r)
        self.stream_idle = Counter(
            "nuclick_stream_idle_timeouts", "Streams ended because their client sent nothing", registry=r
        )
        self.auth_failures = Counter(
            "nuclick_auth_failures", "Calls refused for their token, by port and reason", ["port", "reason"], registry=r
        )
        self.model = Gauge(
            "nuclick_model_info", "The model served (always 1)", ["model", "version", "device"], registry=r
        )
        self.served = Gauge(
            "nuclick_served_model_info",
            "Each model served now, by the name requests give (always 1)",
            ["name", "model", "version"],
            registry=r,
        )
        self.model_requests = Counter(
            "nuclick_model_requests",
            "Segment calls by the served model they named and gRPC status",
            ["name", "code"],
            registry=r,
        )
        self.reloads = Counter(
            "nuclick_model_reloads", "Re-reads of the models folder, by result", ["result"], registry=r
        )

    def set_model(self, name: str, version: str, device: str) -> None:
        self.model.labels(model=name, version=version, device=device).set(1)

    def set_served(self, models: list[tuple[str, str, str]]) -> None:
        """(served name, model name, version) of every model served now; the ones that left are removed."""
        self.served.clear()
        for name, model, version in models:
            self.served.labels(name=name, model=model, version=version).set(1)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue depth when scraped, not on every change."""
        self.queue_depth.set_function(depth)

    def watch_waiting(self, count: Callable[[], float]) -> None:
        """Read the calls waiting for a compute slot when scraped."""
        self.waiting.set_function(count)

    def refuse(self, reason: str, method: str | None = None, code: str | None = None) -> None:
        """One call refused before any work: ``reason`` for ``nuclick_refused_total``;
        ``method`` and ``code`` also count it in ``nuclick_requests_total``."""
        self.refused.labels(reason=reason).inc()
        if method is not None and code is not None:
            self.requests.labels(method=method, code=code).inc()

    def observe(self, method: str, code: str, seconds: float, clicks: int = 0, found: int = 0) -> None:
        self.requests.labels(method=method, code=code).inc()
        self.latency.labels(method=method).observe(seconds)
        if code == "OK":
            self.clicks.inc(clicks)
            self.nuclei.inc(found)

    def render(self) -> bytes:
        """Prometheus' text exposition format."""
        return generate_latest(self.registry)
