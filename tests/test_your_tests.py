"""A user's own tests: an eager suite, celery.contrib.pytest's worker, and the cbtasks fixture."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from celery import Celery

from cbtasks import BreakerPolicy, CircuitBreakerTask, CircuitOpenError, EndpointFailure
from cbtasks.fallbacks import DefaultPrediction, is_fallback
from cbtasks.testing import BreakerControl
from tests.conftest import wait_for


def eager_app() -> Celery:
    """How most Celery projects unit-test their tasks: eager, a memory:// broker, no Redis."""
    app = Celery("users-app", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, task_eager_propagates=True)
    return app


def test_an_eager_suite_keeps_passing_with_the_base_class(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Adding base=CircuitBreakerTask breaks no existing eager test: no Redis asked for,
    the breaker's state kept in the process (said once in the log), answers unchanged."""
    app = eager_app()

    @app.task(base=CircuitBreakerTask, bind=True, name="users.add")
    def add(self: Any, x: int, y: int) -> int:
        return x + y

    @app.task(base=CircuitBreakerTask, bind=True, name="users.divide")
    def divide(self: Any, x: int, y: int) -> float:
        return x / y

    caplog.set_level(logging.INFO, logger="cbtasks")
    # The user's own tests, as they were before cbtasks:
    assert add.delay(2, 3).get() == 5
    assert add(4, 5) == 9
    assert add.apply(args=(1, 1)).get() == 2
    with pytest.raises(ZeroDivisionError):
        divide.delay(1, 0).get()
    said = [r.getMessage() for r in caplog.records if "memory://" in r.getMessage()]
    assert len(said) == 1 and "eagerly" in said[0]


def test_an_open_circuit_in_an_eager_test(cbtasks: BreakerControl) -> None:
    """Eager: no queue to defer to. Forced open, a task with a fallback answers with it;
    one without raises CircuitOpenError to the caller, and the endpoint is not called."""
    app = eager_app()
    calls: list[int] = []

    @app.task(
        base=CircuitBreakerTask, bind=True, breaker="users-model", on_open="fallback",
        fallback=DefaultPrediction({"label": "unknown"}), name="users.predict_or_default",
    )  # fmt: skip
    def predict_or_default(self: Any, features: list[float]) -> dict[str, str]:
        calls.append(1)
        return {"label": "setosa"}

    @app.task(base=CircuitBreakerTask, bind=True, breaker="users-model", name="users.predict")
    def predict(self: Any, features: list[float]) -> dict[str, str]:
        calls.append(1)
        return {"label": "setosa"}

    cbtasks.use(app).memory()
    cbtasks.open("users-model")
    answer = predict_or_default.delay([1.0]).get()
    assert is_fallback(answer) and answer["result"] == {"label": "unknown"}
    assert [e.kind for e in cbtasks.fallbacks] == ["default"]
    with pytest.raises(CircuitOpenError):
        predict.delay([1.0]).get()
    assert calls == []
    cbtasks.half_open("users-model")
    assert predict.delay([1.0]).get() == {"label": "setosa"}  # the probe closes it
    assert cbtasks.state("users-model") == "closed"


def test_a_failing_endpoint_opens_the_circuit_in_an_eager_test(cbtasks: BreakerControl) -> None:
    """The breaker counts in eager mode too: five endpoint failures, then refused."""
    app = eager_app()

    @app.task(base=CircuitBreakerTask, bind=True, breaker="flaky-model", name="users.flaky")
    def flaky(self: Any) -> None:
        raise EndpointFailure("503 from the model", status=503)

    cbtasks.use(app).memory()
    for _ in range(5):
        with pytest.raises(EndpointFailure):
            flaky.delay().get()
    assert cbtasks.state("flaky-model") == "open"
    with pytest.raises(CircuitOpenError):
        flaky.delay().get()
    assert [e.by for e in cbtasks.refused] == ["circuit"]


@pytest.fixture
def celery_config() -> dict[str, Any]:
    """celery.contrib.pytest's app: a memory broker, results in memory; JSON only."""
    return {
        "broker_url": "memory://",
        "result_backend": "cache+memory://",
        "task_serializer": "json",
        "accept_content": ["json"],
    }


def test_a_refused_request_is_deferred_under_the_embedded_worker(
    cbtasks: BreakerControl, celery_app: Celery, celery_worker: Any
) -> None:
    """celery.contrib.pytest's worker (threads of this process): a request that meets an
    open circuit is deferred by countdown (the fixture says with what countdown), and runs
    once the circuit closes."""

    @celery_app.task(
        base=CircuitBreakerTask, bind=True, breaker="embedded-model", name="users.embedded",
        breaker_policy=BreakerPolicy(open_seconds=0.3), defer_jitter=0.05,
    )  # fmt: skip
    def predict(self: Any, features: list[float]) -> dict[str, str]:
        return {"label": "setosa"}

    celery_worker.reload()
    cbtasks.use(celery_app).memory()
    cbtasks.open("embedded-model")
    result = predict.delay([1.0])
    wait_for(lambda: cbtasks.deferred, 10, "the request to be deferred")
    first = cbtasks.deferred[0]
    assert first.mode == "countdown" and 0.3 <= first.countdown <= 0.36
    cbtasks.close("embedded-model")
    assert result.get(timeout=10) == {"label": "setosa"}
