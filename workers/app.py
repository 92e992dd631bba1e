"""The Celery app: JSON only, late acks, and the inference tasks.

    celery -A workers.app worker -l info

Environment: CBTASKS_REDIS_URL (breaker state), CBTASKS_BROKER_URL (Redis or
RabbitMQ; default: the Redis URL), CBTASKS_RESULT_URL, CBTASKS_MODEL_URL (the
model server), CBTASKS_MODEL_GRPC_TARGET (its gRPC service, host:port),
CBTASKS_VISIBILITY_TIMEOUT (seconds, Redis broker), CBTASKS_REDIS_TIMEOUT
(seconds a breaker-state Redis call may take, 0.25 by default), CBTASKS_METRICS_PORT
(Prometheus metrics of all the worker's processes).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

from celery import Celery, signals

from cbtasks import BreakerPolicy, CallerError, CircuitBreakerTask
from cbtasks.clients import http_client
from cbtasks.clients.grpc import grpc_client
from cbtasks.fallbacks import DefaultPrediction
from workers.config import from_environment

config = from_environment()

if config.metrics_port:
    # Pool processes count into files in this folder; the main process sums
    # them when scraped.
    os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix=f"cbtasks-metrics-{os.getpid()}-")
    )
    from prometheus_client import values

    # prometheus_client picks its value class when first imported, and
    # Flower's plugin for the celery command imports it before this module
    # runs: pick again, now that the folder is set (metrics are made later,
    # in the pool processes, and read values.ValueClass then).
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]

app = Celery("cbtasks-workers", broker=config.broker_url, backend=config.result_url)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    event_serializer="json",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_send_sent_event=True,
    worker_send_task_events=True,
    broker_transport_options={
        "visibility_timeout": config.visibility_timeout,
        # kombu looks for unacknowledged messages to restore about every
        # interval x throttle seconds (100 s by default): with a short
        # visibility timeout, look often enough that a dead worker's tasks
        # come back within the timeout or so.
        "unacked_restore_interval": min(10.0, max(1.0, config.visibility_timeout / 10)),
        "unacked_restore_throttle": 1 if config.visibility_timeout < 600 else 10,
        # A worker killed during a sweep leaves its lock held this long (300 s
        # by default), and no one restores anything meanwhile.
        "unacked_mutex_expire": min(300.0, max(5.0, config.visibility_timeout)),
    },
    broker_connection_retry_on_startup=True,
    cbtasks_redis_url=config.redis_url,
    cbtasks_redis_timeout=config.redis_timeout,
    cbtasks_policy=BreakerPolicy(failure_threshold=5, open_seconds=2.0, half_open_probes=2),
)


@signals.worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """The worker's main process serves every pool process's metrics on CBTASKS_METRICS_PORT."""
    if config.metrics_port:
        from cbtasks import RedisStore
        from cbtasks.ops.metrics import serve_worker_metrics

        serve_worker_metrics(RedisStore(config.redis_url), config.metrics_port)


def validate_features(features: Any) -> list[float]:
    """Four numbers, or a CallerError saying what is wrong (it never trips the breaker)."""
    if not isinstance(features, list) or len(features) != 4:
        raise CallerError(f"features must be a list of 4 numbers, got {features!r:.100}")
    if not all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
        for x in features
    ):
        raise CallerError(f"features must all be finite numbers, got {features!r:.100}")
    return [float(x) for x in features]


def call_model(task: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """The endpoint call every inference task makes; the task id travels as X-Request-ID."""
    payload = {"features": validate_features(features)}
    answer: dict[str, Any] = http_client(config.model_url).predict(
        payload, request_id=task.request.id
    )
    return answer


@app.task(base=CircuitBreakerTask, bind=True, breaker="iris-model", name="workers.predict")
def predict(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """Predict an iris species through the shared breaker; deferred while it is open."""
    return call_model(self, features)


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker="iris-model",
    defer="park",
    name="workers.predict_parked",
)
def predict_parked(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """The same, with deferred requests parked in Redis until the circuit closes."""
    return call_model(self, features)


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker="iris-model",
    defer="pause",
    name="workers.predict_paused",
)
def predict_paused(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """The same, on the breaker's own queue, which the fleet stops consuming while open."""
    return call_model(self, features)


# defer="pause" stops the whole queue: it must be the breaker's own.
app.conf.task_routes = {"workers.predict_paused": {"queue": "iris-model"}}


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker="iris-model",
    on_open="fallback",
    fallback=DefaultPrediction({"label": "unknown", "probabilities": []}),
    name="workers.predict_or_default",
)
def predict_or_default(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """Answers at once with a marked default prediction while the circuit is open."""
    return call_model(self, features)


@app.task(
    base=CircuitBreakerTask, bind=True, breaker="iris-model-grpc", name="workers.predict_grpc"
)
def predict_grpc(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """The same model over gRPC (CBTASKS_MODEL_GRPC_TARGET), through its own breaker."""
    if config.model_grpc_target is None:
        raise CallerError("set CBTASKS_MODEL_GRPC_TARGET (host:port) to call the model over gRPC")
    payload = {"features": validate_features(features)}
    return grpc_client(config.model_grpc_target).predict(payload, request_id=self.request.id)
