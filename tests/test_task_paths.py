"""A CircuitBreakerTask's own paths, run in-process: what it reports when it defers, once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import Ignore

from cbtasks import CircuitBreakerTask, EndpointFailure, RequestDeferred, RequestWaited
from cbtasks.task._headers import DEFERRALS, DEFERRED_AT, DEFERRED_BY


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    """An app whose broker is in memory and whose results are kept in memory."""
    app = Celery("paths", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(cbtasks_redis_url=redis_url, task_serializer="json", accept_content=["json"])
    yield app
    # The memory cache backend is one per process: a result kept for "req-1" would
    # answer the next run's "req-1" through the completion guard (mutmut runs twice).
    app.backend.client.delete(app.backend.get_key_for_task("req-1"))


def run_as_worker(task: Any, headers: dict[str, Any] | None = None, *args: Any) -> Any:
    """Run ``task`` as a worker would: a request of its own, not called directly."""
    task.push_request(
        id="req-1", args=args, kwargs={}, headers=headers or {}, called_directly=False,
        is_eager=False, delivery_info={}, retries=0, **(headers or {}),
    )  # fmt: skip
    try:
        return task(*args)
    finally:
        task.pop_request()


def events_of(task: Any) -> list[Any]:
    seen: list[Any] = []
    task.cbtasks_breaker.events.subscribe(seen.append)
    return seen


def test_a_park_that_fails_is_reported_as_the_countdown_it_became(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis cannot take the parked request: it is deferred by countdown, and the result
    backend, the event and the request's own header all say countdown, not park."""

    @app.task(
        base=CircuitBreakerTask,
        bind=True,
        shared=False,
        breaker="paths-park",
        defer="park",
        name="p",
    )
    def _predict(self: Any) -> str:
        raise EndpointFailure("503", status=503)

    predict = app.tasks["p"]

    def no_redis(*args: Any, **kwargs: Any) -> None:
        raise redis.ConnectionError("Redis is away")

    monkeypatch.setattr(type(predict), "_park", no_redis)
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(
        type(predict),
        "signature_from_request",
        lambda self, request, args, kwargs, **options: type(
            "Sig", (), {"apply_async": lambda s: sent.append(options)}
        )(),
    )
    seen = events_of(predict)
    with pytest.raises(Ignore):
        run_as_worker(predict)
    meta = predict.backend.get_task_meta("req-1")
    assert meta["status"] == "CIRCUIT_OPEN" and meta["result"]["mode"] == "countdown"
    assert [e.mode for e in seen if isinstance(e, RequestDeferred)] == ["countdown"]
    assert sent[0]["headers"][DEFERRED_BY] == "countdown"


def test_a_deferred_request_is_said_to_have_waited_once_and_how(app: Celery) -> None:
    """A parked request that runs and fails again is deferred again: no RequestWaited yet;
    when it runs to the end, one, tagged park as its deferral said."""
    answers = iter([EndpointFailure("503", status=503), "ok"])

    @app.task(
        base=CircuitBreakerTask,
        bind=True,
        shared=False,
        breaker="paths-wait",
        defer="park",
        name="w",
    )
    def _predict(self: Any) -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    predict = app.tasks["w"]

    seen = events_of(predict)
    deferred = {DEFERRALS: 1, DEFERRED_AT: time.time() - 5, DEFERRED_BY: "park"}
    with pytest.raises(Ignore):
        run_as_worker(predict, deferred)
    assert [e for e in seen if isinstance(e, RequestWaited)] == []
    assert run_as_worker(predict, deferred) == "ok"
    waited = [e for e in seen if isinstance(e, RequestWaited)]
    assert len(waited) == 1 and waited[0].mode == "park" and waited[0].seconds >= 5


def test_a_redelivered_message_of_a_completed_task_is_answered_by_the_guard(
    app: Celery,
) -> None:
    """A fresh message (stamped on receipt, not deferred) that the broker flags as
    redelivered, whose task id already succeeded: the guard answers with the result it
    kept, and the endpoint is not called a second time."""
    from cbtasks.task._headers import RECEIVED_AT

    calls: list[int] = []

    @app.task(base=CircuitBreakerTask, bind=True, shared=False, breaker="paths-guard", name="g")
    def _predict(self: Any) -> str:
        calls.append(1)
        return "second call"

    predict = app.tasks["g"]
    predict.backend.mark_as_done("req-1", "first answer")
    predict.push_request(
        id="req-1", args=(), kwargs={}, headers={}, called_directly=False, is_eager=False,
        retries=0, delivery_info={"redelivered": True}, **{RECEIVED_AT: time.monotonic()},
    )  # fmt: skip
    try:
        assert predict() == "first answer"
    finally:
        predict.pop_request()
    assert calls == []


def test_a_fresh_message_is_not_looked_up() -> None:
    """The healthy path reads nothing: a message neither redelivered, deferred nor held
    long is not looked up (the other half of the rule above)."""
    from types import SimpleNamespace

    from cbtasks.task._headers import RECEIVED_AT

    task = CircuitBreakerTask()
    task.app = Celery("fresh", set_as_current=False)
    request = SimpleNamespace(
        delivery_info={"redelivered": False}, headers={}, **{RECEIVED_AT: time.monotonic()}
    )
    assert task._may_have_run(request) is False
    request.delivery_info = {"redelivered": True}
    assert task._may_have_run(request) is True
