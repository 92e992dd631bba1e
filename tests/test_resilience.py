"""The resilience suite: Redis stopped, workers killed, a flapping and a slow endpoint.

Run on its own with ``pytest -m resilience``. ``make test`` runs the short
form; ``CBTASKS_LONG=1`` runs the full durations the issue names (a 10 s
Redis outage either way, a minute of flapping instead of 16 s).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from cbtasks import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    CountWindow,
    EndpointFailure,
    Outcome,
    RedisStore,
    State,
    StateChange,
)
from cbtasks._testing.processes import CeleryWorker, ModelServer, client_app
from cbtasks._testing.redis_server import RedisServer, free_port
from cbtasks.clients import HTTPModelClient
from tests.conftest import wait_for

pytestmark = pytest.mark.resilience
LONG = os.environ.get("CBTASKS_LONG") == "1"
FEATURES = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module")
def model() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


def test_breaker_redis_stopped_for_ten_seconds(model: ModelServer, tmp_path: Path) -> None:
    """Tasks go on as on_error says (local breakers), nothing is lost, the store reconnects,
    and the store-error metric counted the outage."""
    model.clear_faults()
    model.reset_stats()
    with RedisServer() as broker, RedisServer() as state_redis:
        metrics_port = free_port()
        env = {
            "CBTASKS_BROKER_URL": broker.url,
            "CBTASKS_RESULT_URL": broker.url,
            "CBTASKS_REDIS_URL": state_redis.url,
            "CBTASKS_MODEL_URL": model.url,
            "CBTASKS_METRICS_PORT": str(metrics_port),
            # Stopped, Redis refuses at once; restarted, a loaded machine must not
            # time its first calls out (each would skip Redis for a retry interval).
            "CBTASKS_REDIS_TIMEOUT": "2",
        }
        worker = CeleryWorker(env, concurrency=2, log_path=tmp_path / "w.log").start()
        app = client_app(broker.url)
        try:
            app.send_task("workers.predict", (FEATURES,)).get(timeout=60)
            state_redis.stop()
            stopped = time.monotonic()
            during = [app.send_task("workers.predict", (FEATURES,)) for _ in range(40)]
            wait_for(lambda: all(r.ready() for r in during), 60, "tasks during the outage")
            assert all(r.successful() for r in during), "tasks failed while Redis was down"
            wait_for(lambda: time.monotonic() - stopped >= 10, 15, "ten seconds of outage")
            state_redis.start()  # same port, empty: the state was lost with it
            after = [app.send_task("workers.predict", (FEATURES,)) for _ in range(20)]
            assert all(r.get(timeout=60)["label"] == "setosa" for r in after)
            store = RedisStore(state_redis.url)

            def written_again() -> bool:
                # Each process tries Redis again within a retry interval of its
                # return, on its next call: traffic goes on while we look (20
                # fast tasks can all finish inside that interval).
                app.send_task("workers.predict", (FEATURES,)).get(timeout=60)
                return store.names() == ["iris-model"]

            wait_for(written_again, 30, "the workers to write state again", seen=store.names)
            store.close()
            errors = _metric(
                f"http://127.0.0.1:{metrics_port}/metrics", "cbtasks_store_errors_total"
            )
            assert errors >= 1
        finally:
            worker.stop()


def test_workers_killed_at_random_complete_every_task_once(
    model: ModelServer, tmp_path: Path
) -> None:
    """SIGKILL during a run with acks_late: every task succeeds, each with one successful call.

    Counted where it happens, at the model server: a call whose request id (the
    task id) was answered before is a duplicate. (A redelivered message whose
    task had finished sends another task-succeeded event, so events cannot
    tell.) Two windows belong to no worker and are kept out of the kill: the
    one between the server's answer and the worker's completion mark (no
    process can know the call succeeded: at-least-once), and kombu's Redis
    transport's between BRPOP and recording the message as unacked (a message
    popped there is lost with the process). So before each kill the workers
    stop consuming and the test waits until every answer given is marked
    complete; what the kill then hits (prefetched messages, countdowns held in
    memory, completed tasks not yet acknowledged) is cbtasks' and Celery's part.
    """
    model.clear_faults()
    model.reset_stats()  # the server is shared by the module: count this test's calls only
    model.faults(latency_ms=20)
    with RedisServer() as redis_server:
        env = {
            "CBTASKS_REDIS_URL": redis_server.url,
            "CBTASKS_MODEL_URL": model.url,
            "CBTASKS_VISIBILITY_TIMEOUT": "4",
            # A completion mark that times out is skipped (by design), and the
            # test would wait for it forever: not on a loaded machine.
            "CBTASKS_REDIS_TIMEOUT": "2",
        }
        app = client_app(redis_server.url)
        marks = redis.Redis.from_url(redis_server.url)

        def answers_and_marks() -> dict[str, int]:
            # The completion mark of a task with a result backend is its SUCCESS there.
            stats = model.stats()
            metas = [marks.get(key) for key in marks.scan_iter("celery-task-meta-*", count=500)]
            done = sum(1 for raw in metas if raw and json.loads(raw).get("status") == "SUCCESS")
            return {"in_flight": stats["in_flight"], "ok": stats["ok"], "marked": done}

        def settled() -> bool:
            now = answers_and_marks()
            return now["in_flight"] == 0 and now["marked"] == now["ok"]

        workers = [
            CeleryWorker(env, concurrency=2, name=f"k{i}", log_path=tmp_path / f"k{i}.log").start()
            for i in range(2)
        ]
        rng = random.Random(7)
        try:
            results = [app.send_task("workers.predict", (FEATURES,)) for _ in range(150)]
            for round_ in range(3):
                wait_for(
                    lambda n=round_: sum(r.ready() for r in results) >= 30 * (n + 1),
                    120,
                    "progress",
                )
                app.control.cancel_consumer("celery", reply=True, timeout=10, limit=len(workers))
                wait_for(
                    settled,
                    30,
                    "every answer given to be marked complete",
                    seen=lambda: {**answers_and_marks(), **model.stats()},
                )
                victim = rng.randrange(len(workers))
                workers[victim].kill()
                workers[victim] = CeleryWorker(
                    env,
                    concurrency=2,
                    name=f"k{victim}-{round_}",
                    log_path=tmp_path / f"r{round_}.log",
                ).start()
                app.control.add_consumer("celery")  # the survivor; a new worker consumes anyway
            answers = [r.get(timeout=180) for r in results]
            assert all(a["label"] == "setosa" for a in answers)
            stats = model.stats()
            assert stats["calls_after_success"] == 0, "an endpoint call made twice"
            assert stats["ok"] == len(results)
        finally:
            for worker in workers:
                worker.stop()
            model.clear_faults()


def test_flapping_endpoint_backs_off_and_never_over_probes(model: ModelServer) -> None:
    """Up and down every 2 s: the breaker opens and closes, its open periods grow within
    a down stretch, and probes in flight never exceed half_open_probes."""
    model.clear_faults()
    seconds = 60.0 if LONG else 16.0
    policy = BreakerPolicy(
        failure_threshold=3,
        open_seconds=0.2,
        backoff_factor=2.0,
        max_open_seconds=5,
        half_open_probes=2,
    )
    with RedisServer() as redis_server:
        store = RedisStore(redis_server.url)
        opened: list[tuple[float, float, State]] = []  # (at, open for, from)
        breaker = CircuitBreaker("flappy", policy=policy, store=store)

        def on_change(event: StateChange) -> None:
            if event.to_state is State.OPEN:
                status = breaker.status()
                if status is not None and status.open_until is not None:
                    opened.append((event.at, status.open_until - event.at, event.from_state))

        breaker.add_listener(on_change)
        probes_now, probes_max, lock = [0], [0], threading.Lock()
        stop = threading.Event()

        def caller() -> None:
            with HTTPModelClient(model.url, timeout=2) as client:
                while not stop.is_set():
                    try:
                        probe = breaker.admit()
                    except CircuitOpenError:
                        time.sleep(0.01)
                        continue
                    if probe:
                        with lock:
                            probes_now[0] += 1
                            probes_max[0] = max(probes_max[0], probes_now[0])
                    try:
                        client.predict({"features": FEATURES})
                    except EndpointFailure as exc:
                        outcome: BaseException | None = exc
                    else:
                        outcome = None
                    if probe:
                        with lock:
                            probes_now[0] -= 1
                    if outcome is None:
                        breaker.record(probe, Outcome.SUCCESS)
                    else:
                        breaker.record_exception(probe, outcome, 0.0)

        threads = [threading.Thread(target=caller, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        down = False
        try:
            while time.monotonic() - started < seconds:
                down = not down
                if down:
                    model.faults(outage_seconds=2)
                else:
                    model.clear_faults()
                flip = time.monotonic()
                wait_for(lambda f=flip: time.monotonic() - f >= 2, 5, "the next flip")
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
            model.clear_faults()
            store.close()
        assert probes_max[0] <= policy.half_open_probes
        from_closed = [o for o in opened if o[2] is State.CLOSED]
        assert len(from_closed) >= 2, "it should open in more than one down stretch"
        # Within a down stretch, each failed probe reopens it for longer.
        grew = any(
            later[2] is State.HALF_OPEN and later[1] > earlier[1] * 1.5
            for earlier, later in itertools.pairwise(opened)
        )
        assert grew, opened


def test_slow_endpoint_trips_by_slow_call_rate(model: ModelServer) -> None:
    """No errors, only latency above the threshold: the slow-call rate opens it."""
    model.clear_faults()
    model.faults(latency_ms=120)
    policy = BreakerPolicy(
        failure_threshold=100,
        slow_call_seconds=0.05,
        slow_call_rate=0.5,
        window=CountWindow(calls=10),
        min_calls=5,
    )
    events: list[StateChange] = []
    breaker = CircuitBreaker("slow", policy=policy, listeners=[events.append])
    try:
        with HTTPModelClient(model.url) as client:
            for _ in range(5):
                breaker.call(client.predict, {"features": FEATURES})
        assert breaker.state is State.OPEN
        assert events and events[0].reason.startswith("slow-call rate 100%")
    finally:
        model.clear_faults()


def _metric(url: str, name: str) -> float:
    text = httpx.get(url, timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )
