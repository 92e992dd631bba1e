"""The worker app the tests start: the example app plus tasks only the tests use.

celery -A tests.worker_tasks worker
"""

from __future__ import annotations

from typing import Any

from cbtasks import BreakerPolicy, CircuitBreakerTask
from workers.app import (
    app,
    call_model,
    predict,
    predict_grpc,
    predict_or_default,
    predict_parked,
)

__all__ = ["app", "predict", "predict_grpc", "predict_or_default", "predict_parked"]


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker="pause-model",
    defer="pause",
    name="tests.predict_paused",
)
def predict_paused(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """Its queue is paused by every worker while its circuit is open."""
    return call_model(self, features)


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker="iris-model",
    completion_check="always",
    name="tests.predict_checked",
)
def predict_checked(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """The completion guard looks at every message: the same task id again gets the result."""
    return call_model(self, features)


# The paused queue is the breaker's own: only predict_paused is routed there.
app.conf.task_routes = {**app.conf.task_routes, "tests.predict_paused": "pause-model"}


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker="iris-model",
    max_deferrals=2,
    defer_jitter=0.1,
    name="tests.predict_impatient",
)
def predict_impatient(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """Deferred at most twice, then fails visibly with CircuitOpenError."""
    return call_model(self, features)


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker="iris-model",
    max_retries=3,
    default_retry_delay=0.1,
    name="tests.retry_twice",
)
def retry_twice(self: CircuitBreakerTask) -> dict[str, Any]:
    """Asks for two retries of its own; reports the retry and deferral counts it saw."""
    if self.request.retries < 2:
        raise self.retry()
    return {
        "retries": self.request.retries,
        "deferrals": getattr(self.request, "cbtasks_deferrals", None) or 0,
    }


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker="slow-probe-model",
    breaker_policy=BreakerPolicy(failure_threshold=1, open_seconds=0.5, probe_lease_seconds=2.0),
    name="tests.predict_short_lease",
)
def predict_short_lease(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """A breaker whose probes hold their slot for 2 s at most (the probe-lease test)."""
    return call_model(self, features)


@app.task(base=CircuitBreakerTask, bind=True, breaker="iris-model", name="tests.lineage")
def lineage(self: CircuitBreakerTask) -> dict[str, Any]:
    """Reports the ids it runs with: a deferral must keep its parent and root."""
    return {
        "id": self.request.id,
        "parent_id": self.request.parent_id,
        "root_id": self.request.root_id,
        "deferrals": getattr(self.request, "cbtasks_deferrals", None) or 0,
    }
