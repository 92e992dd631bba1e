"""Prometheus metrics: fleet state read from Redis, and per-process event counters.

Two sources, each correct under Celery's prefork pool:

- :class:`BreakerCollector` reads every breaker's shared state from Redis at
  scrape time (state, consecutive failures, trips, probes in use, parked
  requests): one truth for the fleet, whichever process is scraped.
- Counters (calls by outcome, transitions, deferrals, fallbacks, store
  errors) are counted where they happen. With ``PROMETHEUS_MULTIPROC_DIR``
  set (the worker's ``CBTASKS_METRICS_PORT`` sets it), every pool process
  writes them to shared files and :func:`serve_worker_metrics` sums them.

prometheus_client is imported only here, so the library works without it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from .._errors import StoreUnavailableError
from .._events import (
    CallRecorded,
    CallRejected,
    Event,
    FallbackServed,
    HealthChecked,
    RequestDeferred,
    RequestWaited,
)
from .._state import StateChange
from ..stores import RedisStore
from ._fleet import read_fleet

__all__ = ["BreakerCollector", "Metrics", "metrics", "serve_store_metrics", "serve_worker_metrics"]

STATES = ("closed", "open", "half_open")
MODES = ("normal", "disabled", "forced_open")
# Seconds: a model call from a few milliseconds to a minute.
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds a deferred request waited for its circuit: a probe's pause to a day.
WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 86400.0)

log = logging.getLogger("cbtasks.metrics")


class BreakerCollector:
    """Every breaker in a RedisStore, read at scrape time."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        state = GaugeMetricFamily(
            "cbtasks_breaker_state",
            "1 for the breaker's current state",
            labels=["breaker", "state"],
        )
        failures = GaugeMetricFamily(
            "cbtasks_breaker_consecutive_failures", "Failures in a row", labels=["breaker"]
        )
        # A gauge that falls to 0 on close: the backoff's count, not a total (for
        # trips over time: increase(cbtasks_transitions_total{to_state="open"}[..])).
        trips = GaugeMetricFamily(
            "cbtasks_breaker_trips_in_a_row",
            "Trips since the circuit last closed (what the open period's backoff counts)",
            labels=["breaker"],
        )
        mode = GaugeMetricFamily(
            "cbtasks_breaker_mode",
            "1 for the breaker's current mode (normal, disabled: shadow mode, forced_open)",
            labels=["breaker", "mode"],
        )
        probes = GaugeMetricFamily(
            "cbtasks_breaker_probes_in_use", "Half-open probes in flight", labels=["breaker"]
        )
        parked = GaugeMetricFamily(
            "cbtasks_breaker_parked_requests", "Requests parked until it closes", labels=["breaker"]
        )
        paused = GaugeMetricFamily(
            "cbtasks_queue_paused",
            "Workers that stopped consuming the breaker's queue while it is open (defer=pause)",
            labels=["breaker"],
        )
        backlog = GaugeMetricFamily(
            "cbtasks_queue_backlog",
            "Messages waiting in the breaker's paused queue (defer=pause), as a paused worker "
            "counted them",
            labels=["breaker"],
        )
        limit = GaugeMetricFamily(
            "cbtasks_limit_concurrency",
            "The fleet's concurrency limit now (a static one, or where the adaptive one stands)",
            labels=["breaker"],
        )
        in_flight = GaugeMetricFamily(
            "cbtasks_limit_in_flight",
            "Calls holding one of the limit's slots now",
            labels=["breaker"],
        )
        admitted = GaugeMetricFamily(
            "cbtasks_limit_admitted_last_second",
            "Calls the limit admitted in the last whole second, fleet-wide",
            labels=["breaker"],
        )
        tokens = GaugeMetricFamily(
            "cbtasks_limit_tokens_available",
            "Tokens that may be spent now under the limit's token budget",
            labels=["breaker"],
        )
        try:
            for read in read_fleet(self.store):
                name, status = read.name, read.status
                if status is None:  # corrupt: say so, keep the rest
                    log.warning("metrics: %s", read.error)
                    state.add_metric([name, "corrupt"], 1.0)
                    continue
                for value in STATES:
                    state.add_metric([name, value], 1.0 if status.state.value == value else 0.0)
                for value in MODES:
                    mode.add_metric(
                        [name, value], 1.0 if status.mode.name.lower() == value else 0.0
                    )
                failures.add_metric([name], status.consecutive_failures)
                trips.add_metric([name], status.trips)
                probes.add_metric([name], status.probes_in_use)
                parked.add_metric([name], read.lot.count())
                paused.add_metric([name], read.paused)
                backlog.add_metric([name], read.backlog or 0)
                if status.limit is not None:
                    if status.limit.concurrency is not None:
                        limit.add_metric([name], status.limit.concurrency)
                    in_flight.add_metric([name], status.limit.in_flight)
                    admitted.add_metric([name], status.limit.admitted_last_second)
                    if status.limit.tokens_available is not None:
                        tokens.add_metric([name], status.limit.tokens_available)
        except StoreUnavailableError as exc:  # the scrape shows what it got, and the
            log.warning("metrics: %s", exc)  # per-process counters still answer
        yield from (state, mode, failures, trips, probes, parked, paused, backlog)
        yield from (limit, in_flight, admitted, tokens)


class Metrics:
    """The per-process counters; a no-op where prometheus_client is missing."""

    def __init__(self) -> None:
        try:
            from prometheus_client import Counter, Histogram
        except ImportError:  # pragma: no cover - the metrics extra is not installed
            self.enabled = False
            return
        self.enabled = True
        self.calls = Counter("cbtasks_calls", "Guarded calls by outcome", ["breaker", "outcome"])
        self.call_duration = Histogram(
            "cbtasks_call_duration_seconds",
            "Time the endpoint took, by outcome (calls made; rejections take none)",
            ["breaker", "outcome"],
            buckets=CALL_BUCKETS,
        )
        self.deferral_wait = Histogram(
            "cbtasks_deferral_wait_seconds",
            "Time from a request's first deferral to its run, by how it waited",
            ["breaker", "mode"],
            buckets=WAIT_BUCKETS,
        )
        self.transitions = Counter(
            "cbtasks_transitions",
            "State transitions made here",
            ["breaker", "from_state", "to_state"],
        )
        self.deferrals = Counter("cbtasks_deferrals", "Requests deferred", ["breaker", "mode"])
        self.refused = Counter(
            "cbtasks_refused",
            "Calls refused without reaching the endpoint, by what refused them "
            "(circuit, concurrency, rate, tokens)",
            ["breaker", "by"],
        )
        self.fallbacks = Counter(
            "cbtasks_fallbacks", "Requests answered by a fallback", ["breaker", "kind"]
        )
        # Not an outcome: a probe is also counted under its outcome in calls.
        self.probes = Counter("cbtasks_probes", "Half-open probe calls made here", ["breaker"])
        self.health_checks = Counter(
            "cbtasks_health_checks",
            "Health checks made while open, by result (healthy, unhealthy, timeout, unreachable)",
            ["breaker", "result"],
        )
        self.store_errors = Counter(
            "cbtasks_store_errors",
            "Failed Redis calls of the breaker store and of the completion guard",
        )

    def observe(self, event: Event) -> None:
        """A subscriber of every breaker's events: each call counted once, as it was recorded."""
        if not self.enabled:
            return
        match event:
            case CallRecorded(breaker=breaker, outcome=outcome, seconds=seconds):
                label = "slow" if event.slow else outcome.name.lower()
                self.calls.labels(breaker, label).inc()
                if seconds is not None:
                    self.call_duration.labels(breaker, label).observe(seconds)
                if event.probe:
                    self.probes.labels(breaker).inc()
            case CallRejected(breaker=breaker, by=by):
                self.calls.labels(breaker, "rejected").inc()
                self.refused.labels(breaker, by).inc()
            case StateChange():
                self.transitions.labels(
                    event.breaker, event.from_state.value, event.to_state.value
                ).inc()
            case HealthChecked(breaker=breaker, healthy=healthy, error=error):
                self.health_checks.labels(breaker, health_result(healthy, error)).inc()
            case RequestDeferred(breaker=breaker, mode=mode):
                self.deferrals.labels(breaker, mode).inc()
            case FallbackServed(breaker=breaker, kind=kind):
                self.fallbacks.labels(breaker, kind).inc()
            case RequestWaited(breaker=breaker, mode=mode, seconds=seconds):
                self.deferral_wait.labels(breaker, mode).observe(max(0.0, seconds))

    def store_error(self, exc: BaseException) -> None:
        if self.enabled:
            self.store_errors.inc()


_metrics: Metrics | None = None
_lock = threading.Lock()


def health_result(healthy: bool, error: BaseException | None) -> str:
    """The ``result`` label of a health check: healthy, timeout (no answer in time),
    unreachable (refused, unknown host, reset) or unhealthy (it answered: not ready,
    or the check raised something else)."""
    if healthy:
        return "healthy"
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ConnectionError):
        return "unreachable"
    return "unhealthy"


def metrics() -> Metrics:
    """This process's counters, made on first use."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics()
        return _metrics


def serve_store_metrics(store: RedisStore, port: int, host: str = "127.0.0.1") -> None:
    """Serve the fleet's breaker state from Redis on ``host:port`` (a background thread)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(BreakerCollector(store))
    start_http_server(port, addr=host, registry=registry)


def serve_worker_metrics(store: RedisStore, port: int, host: str = "0.0.0.0") -> None:
    """Serve every pool process's counters plus the fleet state (in the worker's main process)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(BreakerCollector(store))
    start_http_server(port, addr=host, registry=registry)
