"""The worker app the tests start: the example app plus tasks only the tests use.

celery -A tests.worker_tasks worker
"""

from __future__ import annotations

import time
from typing import Any

from cbtasks import BreakerPolicy, CircuitBreakerTask, Limit
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


def _noting_deferrals(task: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    started_at = time.time()  # just after the limit admitted the call
    answer = call_model(task, features)
    answer["started_at"] = started_at
    answer["deferrals"] = getattr(task.request, "cbtasks_deferrals", None) or 0
    answer["retries"] = task.request.retries
    return answer


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker="limited-model",
    limit=Limit(concurrency=2, lease=3),
    limit_wait=0,
    name="tests.predict_limited",
)
def predict_limited(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """At most two calls in flight across the fleet; the rest deferred by countdown at once."""
    return _noting_deferrals(self, features)


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker="rated-model",
    limit={"rate": "10/s"},
    name="tests.predict_rated",
)
def predict_rated(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """Ten calls a second across the fleet (the limit given as a dict, as settings hold it)."""
    return _noting_deferrals(self, features)


@app.task(
    base=CircuitBreakerTask,
    bind=True,
    breaker="paused-limited-model",
    defer="pause",
    limit=Limit(concurrency=1, lease=3),
    name="tests.predict_limited_paused",
)
def predict_limited_paused(self: CircuitBreakerTask, features: Any) -> dict[str, Any]:
    """One call in flight; on its own queue, where a refused request waits in its process."""
    return _noting_deferrals(self, features)


app.conf.task_routes = {
    **app.conf.task_routes,
    "tests.predict_limited_paused": "paused-limited-model",
}
