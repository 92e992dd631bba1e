"""The pools people run model calls on: each real worker pool through an outage."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbtasks import CircuitBreaker, RedisStore
from cbtasks._testing.processes import CeleryWorker, ModelServer
from cbtasks._testing.redis_server import RedisServer
from cbtasks.fallbacks import is_fallback
from tests.conftest import wait_for, worker_tasks_on

FEATURES = [5.1, 3.5, 1.4, 0.2]
#: Each pool with the concurrency a fleet would give it (I/O-bound calls: many greenlets).
POOLS = {"prefork": 4, "threads": 8, "gevent": 16, "eventlet": 16, "solo": 1}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("logs")
    with RedisServer() as redis_server, ModelServer() as model:
        env = {"CBTASKS_REDIS_URL": redis_server.url, "CBTASKS_MODEL_URL": model.url}
        store = RedisStore(redis_server.url)
        try:
            with worker_tasks_on(redis_server.url, env) as tasks:
                yield {"model": model, "tasks": tasks, "env": env, "logs": logs, "store": store}
        finally:
            store.close()


@pytest.mark.resilience
@pytest.mark.parametrize("pool", list(POOLS))
def test_every_pool_goes_through_an_outage(stack: dict[str, Any], pool: str) -> None:
    """100 predictions, a 3 s outage in the middle: every one answered by the model, none
    twice; the trip stops the calls (at most the trip, the calls in flight when it tripped,
    and the probes of each half-open window reach the failing endpoint)."""
    model, tasks = stack["model"], stack["tasks"]
    concurrency = POOLS[pool]
    breaker = CircuitBreaker("iris-model", store=stack["store"])
    breaker.reset()
    model.clear_faults()
    model.reset_stats()
    worker = CeleryWorker(
        stack["env"],
        concurrency=concurrency,
        pool=pool,
        name=f"pool-{pool}",
        log_path=Path(stack["logs"]) / f"{pool}.log",
        app="tests.worker_tasks",
    ).start()
    try:
        results = [tasks.predict.delay(FEATURES) for _ in range(30)]
        wait_for(lambda: all(r.ready() for r in results), 60, "the first tasks")
        model.phase("outage")
        model.faults(outage_seconds=3)
        results += [tasks.predict.delay(FEATURES) for _ in range(70)]
        wait_for(lambda: not model.stats()["down"], 30, "the outage to end")
        model.phase("recovery")
        answers = [r.get(timeout=120) for r in results]
    finally:
        worker.stop()
    assert all(a["label"] == "setosa" and not is_fallback(a) for a in answers)
    stats = model.stats()
    assert stats["calls_after_success"] == 0
    policy = tasks.app.conf.cbtasks_policy
    windows = math.ceil(3 / policy.open_seconds) + 1
    bound = policy.failure_threshold + (concurrency - 1) + policy.half_open_probes * windows
    assert stats["phases"]["outage"]["failed"] <= bound, (pool, stats["phases"]["outage"])
