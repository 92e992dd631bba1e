"""What users pick instead of cbtasks today, for the benchmarks to compare against.

    celery -A bench.baselines worker

The example app's tasks plus plain Celery autoretry and pybreaker (a
bench-only dependency, ``pip install '.[bench]'``).
"""

from __future__ import annotations

import os
from typing import Any

import pybreaker
import redis

from cbtasks import BreakerPolicy, EndpointFailure
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
