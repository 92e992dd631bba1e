"""What users pick instead of cbtasks today, for the benchmarks to compare against.

    celery -A bench.baselines worker

The example app's tasks plus plain Celery autoretry and pybreaker (a
bench-only dependency, ``pip install '.[bench]'``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pybreaker
import redis

from cbtasks import BreakerPolicy, CircuitBreakerTask, EndpointFailure
from cbtasks.clients import http_client
from workers.app import app, config, validate_features

__all__ = ["app"]

if os.environ.get("CBTASKS_BENCH_OPEN_SECONDS"):
    # The bench's scenarios choose the open period (the example app's is 2 s).
    app.conf.cbtasks_policy = BreakerPolicy(
        failure_threshold=5,
        open_seconds=float(os.environ["CBTASKS_BENCH_OPEN_SECONDS"]),
        half_open_probes=2,
    )
    # One process of the fleet asks /healthz each second while the circuit is
    # open: the open period ends when the endpoint is back, not on a schedule.
    app.conf.cbtasks_health_check = lambda: http_client(config.model_url).healthy()

_breakers: dict[tuple[int, str], pybreaker.CircuitBreaker] = {}


def _breaker(kind: str) -> pybreaker.CircuitBreaker:
    """One pybreaker per process, as users write it: in memory, or on Redis storage."""
    key = (os.getpid(), kind)
    if key not in _breakers:
        storage = None
        if kind == "redis":
            storage = pybreaker.CircuitRedisStorage(
                pybreaker.STATE_CLOSED, redis.Redis.from_url(config.redis_url), namespace="pb-iris"
            )
        _breakers[key] = pybreaker.CircuitBreaker(
            fail_max=5,
            reset_timeout=float(os.environ.get("CBTASKS_BENCH_OPEN_SECONDS", "2")),
            state_storage=storage,
            exclude=[lambda e: not isinstance(e, EndpointFailure)],
        )
    return _breakers[key]


def _predict(kind: str, task: Any, features: Any) -> dict[str, Any]:
    payload = {"features": validate_features(features)}
    client = http_client(config.model_url)
    return _breaker(kind).call(client.predict, payload, request_id=task.request.id)


_RETRY = {
    "bind": True,
    "autoretry_for": (EndpointFailure, pybreaker.CircuitBreakerError),
    "retry_backoff": 0.5,
    "retry_backoff_max": 10,
    "retry_jitter": True,
    "max_retries": None,
}


@app.task(name="workers.predict_pybreaker_redis", **_RETRY)
def predict_pybreaker_redis(self: Any, features: Any) -> dict[str, Any]:
    """pybreaker with its Redis storage, retried with backoff when open or failing."""
    return _predict("redis", self, features)


@app.task(name="workers.predict_pybreaker_memory", **_RETRY)
def predict_pybreaker_memory(self: Any, features: Any) -> dict[str, Any]:
    """pybreaker in each process's memory, retried with backoff when open or failing."""
    return _predict("memory", self, features)


@app.task(
    bind=True,
    autoretry_for=(EndpointFailure,),
    retry_backoff=0.5,
    retry_backoff_max=10,
    retry_jitter=True,
    max_retries=None,
    name="workers.predict_autoretry",
)
def predict_autoretry(self: Any, features: Any) -> dict[str, Any]:
    """The baseline the benchmarks compare against: plain Celery autoretry, no breaker."""
    payload = {"features": validate_features(features)}
    return http_client(config.model_url).predict(payload, request_id=self.request.id)


# -- limits (bench/limits.py, bench/adaptive.py) ---------------------------------------
#
# CBTASKS_BENCH_LIMIT holds the limit the run measures (a JSON object of Limit's
# fields) for the breaker "bench-limited"; CBTASKS_BENCH_CELERY_RATE Celery's own
# rate_limit for the baseline beside it.

LIMITED = "bench-limited"
if os.environ.get("CBTASKS_BENCH_LIMIT"):
    app.conf.cbtasks_limit = {LIMITED: json.loads(os.environ["CBTASKS_BENCH_LIMIT"])}


def _noted(task: Any, features: Any) -> dict[str, Any]:
    started_at = time.time()  # just after the limit admitted it
    payload = {"features": validate_features(features)}
    answer: dict[str, Any] = http_client(config.model_url).predict(
        payload, request_id=task.request.id
    )
    answer["deferrals"] = getattr(task.request, "cbtasks_deferrals", None) or 0
    answer["started_at"] = started_at
    return answer


@app.task(base=CircuitBreakerTask, bind=True, breaker=LIMITED, name="bench.limited")
def limited(self: Any, features: Any) -> dict[str, Any]:
    """Under CBTASKS_BENCH_LIMIT, the task's defaults: a refused request waits up to 1 s in
    its process, then is deferred by countdown."""
    return _noted(self, features)


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker=LIMITED,
    limit_wait=0,
    name="bench.limited_countdown",
)
def limited_countdown(self: Any, features: Any) -> dict[str, Any]:
    """Under CBTASKS_BENCH_LIMIT; every refused request re-published by countdown at once
    (limit_wait=0): what deferral alone costs."""
    return _noted(self, features)


@app.task(
    base=CircuitBreakerTask, bind=True, breaker=LIMITED, defer="pause", name="bench.limited_paused"
)
def limited_paused(self: Any, features: Any) -> dict[str, Any]:
    """Under CBTASKS_BENCH_LIMIT, on the breaker's own queue: refused requests wait in their
    process, the fleet takes the queue at the limit's pace."""
    return _noted(self, features)


app.conf.task_routes = {**(app.conf.task_routes or {}), "bench.limited_paused": LIMITED}


@app.task(
    bind=True,
    rate_limit=os.environ.get("CBTASKS_BENCH_CELERY_RATE") or None,
    name="bench.celery_rated",
)
def celery_rated(self: Any, features: Any) -> dict[str, Any]:
    """Celery's own rate_limit (per worker, as its docs say), no breaker."""
    return _noted(self, features)
