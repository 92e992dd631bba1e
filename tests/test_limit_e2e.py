"""A limit across a fleet: real worker processes, a real Redis, the real model server."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbtasks import CircuitBreaker, Limit, RedisStore
from cbtasks._testing.processes import CeleryWorker, ModelServer
from cbtasks._testing.redis_server import RedisServer
from tests.conftest import wait_for, worker_tasks_on

APP = "tests.worker_tasks"
FEATURES = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Redis and the model server for the module; each test starts its own workers."""
    logs = tmp_path_factory.mktemp("logs")
    with RedisServer() as redis_server, ModelServer() as model:
        env = {
            "CBTASKS_REDIS_URL": redis_server.url,
            "CBTASKS_MODEL_URL": model.url,
            # A killed worker's message comes back after this (the kill test).
            "CBTASKS_VISIBILITY_TIMEOUT": "4",
        }
        store = RedisStore(redis_server.url)
        try:
            with worker_tasks_on(redis_server.url, env) as tasks:
                yield {"model": model, "tasks": tasks, "env": env, "logs": logs, "store": store}
        finally:
            store.close()


def workers(
    stack: dict[str, Any], count: int, concurrency: int, queues: str = "celery"
) -> list[CeleryWorker]:
    stack["model"].clear_faults()
    stack["model"].reset_stats()
    return [
        CeleryWorker(
            stack["env"],
            concurrency=concurrency,
            queues=queues,
            name=f"limit{i}",
            log_path=Path(stack["logs"]) / f"worker{i}.log",
            app=APP,
            prefetch_multiplier=1,
        ).start()
        for i in range(count)
    ]


def stop(fleet: list[CeleryWorker]) -> None:
    for worker in fleet:
        worker.stop()


def test_concurrency_is_held_across_the_fleet(stack: dict[str, Any]) -> None:
    """Limit(concurrency=2) on 2 workers x 3 processes, 100 ms calls: the server never sees
    more than 2 at once; every request runs once, no retry spent."""
    fleet = workers(stack, 2, 3)
    try:
        stack["model"].faults(latency_ms=100)
        results = [stack["tasks"].predict_limited.delay(FEATURES) for _ in range(30)]
        answers = [r.get(timeout=120) for r in results]
    finally:
        stop(fleet)
    stats = stack["model"].stats()
    assert stats["phases"]["default"]["peak_in_flight"] <= 2
    assert stats["requests"] == 30 and stats["calls_after_success"] == 0
    assert all(a["retries"] == 0 for a in answers)
    assert any(a["deferrals"] for a in answers)  # the limit did refuse some


def test_the_rate_is_one_for_the_fleet(stack: dict[str, Any]) -> None:
    """Limit(rate="10/s") on 2 workers x 3 processes: 30 calls take 3 s, never 12 in a second
    (Celery's own rate_limit would let each worker do 10)."""
    fleet = workers(stack, 2, 3)
    try:
        results = [stack["tasks"].predict_rated.delay(FEATURES) for _ in range(30)]
        started = sorted(r.get(timeout=120)["started_at"] for r in results)
    finally:
        stop(fleet)
    assert len(stack["model"].arrivals()) == 30
    assert started[-1] - started[0] >= 2.8
    for i, at in enumerate(started):
        # Admitted 100 ms apart on Redis's clock; the body starts a few ms after.
        assert sum(1 for t in started[i:] if t < at + 0.95) <= 10, started


def test_paused_queue_is_consumed_at_the_limits_pace(stack: dict[str, Any]) -> None:
    """defer="pause" with Limit(concurrency=1): 4 processes take the queue, the refused ones
    wait in their process (no request is re-published), the server sees one at a time."""
    fleet = workers(stack, 1, 4, queues="celery,paused-limited-model")
    try:
        stack["model"].faults(latency_ms=50)
        results = [
            stack["tasks"].predict_limited_paused.apply_async(
                (FEATURES,), queue="paused-limited-model"
            )
            for _ in range(16)
        ]
        answers = [r.get(timeout=120) for r in results]
    finally:
        stop(fleet)
    stats = stack["model"].stats()
    assert stats["phases"]["default"]["peak_in_flight"] == 1
    assert [a["deferrals"] for a in answers] == [0] * 16
    assert stats["requests"] == 16


@pytest.mark.resilience
def test_a_killed_workers_slot_comes_back_after_its_lease(stack: dict[str, Any]) -> None:
    """A worker SIGKILLed mid-call holds the only slot: it is free again within the lease
    (3 s), the fleet goes on, and the killed request runs once when redelivered."""
    model, tasks, store = stack["model"], stack["tasks"], stack["store"]
    doomed = workers(stack, 1, 1)[0]
    limit = CircuitBreaker("limited-model", store=store, limit=Limit(concurrency=2, lease=3))
    try:
        model.faults(latency_ms=30_000)
        stuck = [tasks.predict_limited.delay(FEATURES) for _ in range(1)]

        def held() -> int:
            status = limit.status()
            return 0 if status is None or status.limit is None else status.limit.in_flight

        wait_for(lambda: held() == 1, 30, "the call to hold its slot")
        doomed.kill(signal.SIGKILL)
        model.clear_faults()
        assert held() == 1  # the dead worker's slot, until its lease ends
        wait_for(lambda: held() == 0, 5, "the lease to give the slot back")
        fleet = workers(stack, 1, 2)
        try:
            others = [tasks.predict_limited.delay(FEATURES) for _ in range(6)]
            for r in [*others, *stuck]:
                r.get(timeout=60)
        finally:
            stop(fleet)
    finally:
        doomed.stop()
    assert model.stats()["calls_after_success"] == 0
