"""The Celery app: JSON only, late acks, and the inference tasks.

    celery -A workers.app worker -l info

Environment: CBTASKS_REDIS_URL (breaker state), CBTASKS_BROKER_URL (Redis or
RabbitMQ; default: the Redis URL), CBTASKS_RESULT_URL, CBTASKS_MODEL_URL (the
model server), CBTASKS_VISIBILITY_TIMEOUT (seconds, Redis broker).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from cbtasks import BreakerPolicy, CallerError, CircuitBreakerTask
from cbtasks.clients import http_client
from workers.config import from_environment

config = from_environment()

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
    broker_transport_options={"visibility_timeout": config.visibility_timeout},
    broker_connection_retry_on_startup=True,
    cbtasks_redis_url=config.redis_url,
    cbtasks_policy=BreakerPolicy(failure_threshold=5, open_seconds=2.0, half_open_probes=2),
)


def validate_features(features: Any) -> list[float]:
    """Four numbers, or a CallerError saying what is wrong (it never trips the breaker)."""
    if not isinstance(features, list) or len(features) != 4:
        raise CallerError(f"features must be a list of 4 numbers, got {features!r:.100}")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in features):
        raise CallerError(f"features must all be numbers, got {features!r:.100}")
    return [float(x) for x in features]


@app.task(base=CircuitBreakerTask, bind=True, breaker="iris-model", name="workers.predict")
def predict(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """Predict an iris species through the shared breaker; deferred while it is open."""
    payload = {"features": validate_features(features)}
    return http_client(config.model_url).predict(payload, request_id=self.request.id)


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker="iris-model",
    defer="park",
    name="workers.predict_parked",
)
def predict_parked(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """The same, with deferred requests parked in Redis until the circuit closes."""
    payload = {"features": validate_features(features)}
    return http_client(config.model_url).predict(payload, request_id=self.request.id)
