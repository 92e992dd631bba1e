"""The pools people run model calls on: each real worker pool through an outage."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

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


@pytest.mark.parametrize("pool", ["threads", "gevent"])
def test_a_pool_of_many_acknowledges_at_once(stack: dict[str, Any], pool: str) -> None:
    """64 tasks of one process acknowledging at once (the broker's Redis stalls for a
    moment while they end, as a paused queue's backlog resuming also makes them): every
    request runs to the end. kombu's Redis channel allows 10 connections: without room
    made at worker start, the acks beyond fail ("Couldn't ack"), the unacknowledged
    messages fill the prefetch window and the worker takes nothing more until the
    visibility timeout."""
    model, tasks = stack["model"], stack["tasks"]
    CircuitBreaker("iris-model", store=stack["store"]).reset()
    model.clear_faults()
    model.faults(latency_ms=50)
    log_path = Path(stack["logs"]) / f"many-{pool}.log"
    worker = CeleryWorker(
        stack["env"],
        concurrency=64,
        pool=pool,
        name=f"many-{pool}",
        log_path=log_path,
        app="tests.worker_tasks",
    ).start()
    broker = redis.Redis.from_url(stack["env"]["CBTASKS_REDIS_URL"])
    try:
        results = [tasks.predict.delay(FEATURES) for _ in range(400)]
        stalls = 0
        while not all(r.ready() for r in results) and stalls < 8:
            broker.execute_command("CLIENT", "PAUSE", 300, "WRITE")  # acks wait meanwhile
            stalls += 1
            wanted = 40 * stalls
            wait_for(lambda: sum(r.ready() for r in results) >= wanted, 30, "tasks")  # noqa: B023
        wait_for(lambda: all(r.ready() for r in results), 60, "every request")
        assert all(r.get()["label"] == "setosa" for r in results)
    finally:
        worker.stop()
        broker.close()
        model.clear_faults()
    assert "Couldn't ack" not in log_path.read_text()


def test_room_for_acks_is_made_only_where_the_app_does_not_say() -> None:
    """Set for a Redis broker under a pool that acks from many greenlets of one process;
    left alone for prefork and threads, another broker, or a value of the app's own (a
    warning if too low)."""
    import logging
    from types import SimpleNamespace

    from celery import Celery

    from cbtasks.task._pools import fit_broker_connections

    def app(broker: str, **options: Any) -> Celery:
        made = Celery("pools", broker=broker, set_as_current=False)
        made.conf.broker_transport_options = options
        return made

    gevent = SimpleNamespace(concurrency=64, pool_cls="gevent")
    redis_app = app("redis://localhost:6379/0", visibility_timeout=60)
    said = fit_broker_connections(redis_app, gevent)
    assert said is not None and said[0] == logging.INFO and "set to 74" in said[1]
    assert redis_app.conf.broker_transport_options == {
        "visibility_timeout": 60,
        "max_connections": 74,
    }
    prefork = SimpleNamespace(concurrency=64, pool_cls="prefork")
    assert fit_broker_connections(app("redis://localhost:6379/0"), prefork) is None
    amqp = app("amqp://guest@localhost//")
    assert fit_broker_connections(amqp, gevent) is None
    assert "max_connections" not in amqp.conf.broker_transport_options
    small = SimpleNamespace(concurrency=4, pool_cls="eventlet")  # its acks and the consumer's
    fitted = fit_broker_connections(app("redis://localhost:6379/0"), small)
    assert fitted is not None and "set to 14" in fitted[1]
    threads = SimpleNamespace(concurrency=64, pool_cls="threads")  # acks one at a time
    assert fit_broker_connections(app("redis://localhost:6379/0"), threads) is None
    own = app("redis://localhost:6379/0", max_connections=20)
    warned = fit_broker_connections(own, gevent)
    assert warned is not None and warned[0] == logging.WARNING and "raise it to 74" in warned[1]
    assert own.conf.broker_transport_options["max_connections"] == 20
    from celery.concurrency.gevent import TaskPool

    as_class = SimpleNamespace(concurrency=32, pool_cls=TaskPool)  # a class, as the CLI gives
    assert fit_broker_connections(app("redis://x"), as_class) is not None
