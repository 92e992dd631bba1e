"""Deferral on its own: countdowns, headers, expiry, parked messages, garbage collection."""

from __future__ import annotations

import gc
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from cbtasks import CircuitOpenError, LimitExceeded
from cbtasks.task import _memory
from cbtasks.task._countdown import countdown, deferral_countdown
from cbtasks.task._headers import header
from cbtasks.task._memory import collect_now_and_then
from cbtasks.task._parked import expires_at, parked_message


def app(visibility_timeout: float | None = None) -> Celery:
    celery_app = Celery("deferral", set_as_current=False)
    if visibility_timeout is not None:
        celery_app.conf.broker_transport_options = {"visibility_timeout": visibility_timeout}
    return celery_app


def test_countdown_is_the_wait_plus_jitter() -> None:
    """Until the probe window, spread by at most the jitter."""
    assert countdown(app(), 3.0, 0.0) == 3.0
    spread = [countdown(app(), 3.0, 1.0) for _ in range(200)]
    assert all(3.0 <= s <= 4.0 for s in spread)
    assert max(spread) - min(spread) > 0.5


def test_countdown_has_a_floor_and_a_cap() -> None:
    """Never zero; never past half the visibility timeout (a held message is not redelivered)."""
    assert countdown(app(), 0.0, 0.0) == 0.05
    assert countdown(app(), -5.0, 0.0) == 0.05
    assert countdown(app(10), 60.0, 0.0) == 5.0
    assert countdown(app(), 7200.0, 0.0) == 1800.0  # the default timeout: one hour


def test_a_limits_refusal_is_spread_over_its_own_wait_not_the_circuits_jitter() -> None:
    """A slot due in 0.2 s: the fleet comes back within 0.2 s more, not within the 1 s
    jitter of a circuit; an open circuit's refusal keeps the whole jitter."""
    by_limit = [
        deferral_countdown(app(), LimitExceeded("m", 0.2, "concurrency"), 1.0) for _ in range(200)
    ]
    assert all(0.2 <= s <= 0.4 for s in by_limit)
    by_circuit = [deferral_countdown(app(), CircuitOpenError("m", 0.2), 1.0) for _ in range(200)]
    assert all(0.2 <= s <= 1.2 for s in by_circuit) and max(by_circuit) > 0.5


def test_headers_come_from_the_request_or_its_headers() -> None:
    """Celery puts custom headers on the request; older paths keep them in .headers."""
    assert header(SimpleNamespace(cbtasks_deferrals=3), "cbtasks_deferrals") == 3
    request = SimpleNamespace(headers={"cbtasks_deferrals": 4})
    assert header(request, "cbtasks_deferrals") == 4
    assert header(SimpleNamespace(headers=None), "cbtasks_deferrals") is None


def test_expiry_from_the_request_options() -> None:
    """An ISO time or a timestamp; nothing or nonsense means no expiry."""
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert expires_at({"options": {"expires": when.isoformat()}}) == when.timestamp()
    assert expires_at({"options": {"expires": 1_900_000_000}}) == 1_900_000_000.0
    assert expires_at({"options": {}}) is None
    assert expires_at({"options": {"expires": "soon"}}) is None


def test_a_parked_message_publishes_the_request_as_it_was() -> None:
    """Arguments, retries, headers, queue and Celery's own options; not headers/retries twice."""
    request = SimpleNamespace(
        retries=2,
        delivery_info={"routing_key": "batch"},
        as_execution_options=lambda: {
            "task_id": "t-1",
            "root_id": "r-1",
            "expires": None,
            "headers": {"x": 1},
            "retries": 2,
        },
    )
    task = SimpleNamespace(name="workers.predict", request=request)
    message = parked_message(task, (1, 2), {"k": 3}, {"cbtasks_deferrals": 1})  # type: ignore[arg-type]
    assert message == {
        "task": "workers.predict",
        "args": [1, 2],
        "kwargs": {"k": 3},
        "retries": 2,
        "headers": {"cbtasks_deferrals": 1},
        "queue": "batch",
        "options": {"task_id": "t-1", "root_id": "r-1"},
    }


def test_garbage_is_collected_every_n_deferrals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `every` deferrals a full collection; 0 never."""
    calls: list[Any] = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or 0)
    monkeypatch.setattr(_memory, "_deferrals", iter(range(1, 100)))
    for _ in range(10):
        collect_now_and_then(5)
    assert len(calls) == 2
    for _ in range(10):
        collect_now_and_then(0)
    assert len(calls) == 2


def test_the_event_summary_tells_countdown_parked_failed_and_fallback_apart() -> None:
    """What Flower's task page shows as the result of a task waiting for its circuit."""
    from cbtasks import CircuitOpenError
    from cbtasks.task._reports import event_summary

    exc = CircuitOpenError("iris-model", 2.0, "circuit is open")
    why = "circuit is open (breaker iris-model)"
    assert (
        event_summary(exc, "deferred", {"countdown": 2.345, "deferrals": 3})
        == f"{why}: deferred 2.3 s by countdown, deferral 3"
    )
    assert (
        event_summary(exc, "parked", {"deferrals": 1})
        == f"{why}: parked until the circuit closes, deferral 1"
    )
    assert event_summary(exc, "fallback", {"kind": "cached"}) == (
        f"{why}: answered by the cached fallback"
    )
    assert event_summary(exc, "failed", {}) == f"{why}: not run"
    assert event_summary(exc, "parked", {}) == f"{why}: parked until the circuit closes"
