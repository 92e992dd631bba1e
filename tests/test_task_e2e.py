"""CircuitBreakerTask end to end: real worker processes, a real Redis, the real model server."""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult

from cbtasks import CircuitBreaker, CircuitOpenError, PolicyError, RedisStore, State
from cbtasks._testing.processes import CeleryWorker, ModelServer
from cbtasks._testing.redis_server import RedisServer
from cbtasks.fallbacks import is_fallback
from tests.conftest import wait_for, worker_tasks_on

CONCURRENCY = 4
# The example app plus the tasks only these tests use.
APP = "tests.worker_tasks"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Redis, the model server and a 4-process worker, for the whole module."""
    logs = tmp_path_factory.mktemp("logs")
    with RedisServer() as redis_server, ModelServer(grpc_port=0) as model:
        env = {
            "CBTASKS_REDIS_URL": redis_server.url,
            "CBTASKS_MODEL_URL": model.url,
            "CBTASKS_MODEL_GRPC_TARGET": model.grpc_target or "",
        }
        worker = CeleryWorker(
            env, concurrency=CONCURRENCY, log_path=logs / "worker.log", app=APP
        ).start()
        store = RedisStore(redis_server.url)
        try:
            with worker_tasks_on(redis_server.url, env) as workers_app:
                yield {
                    "redis": redis_server,
                    "model": model,
                    "worker": worker,
                    "tasks": workers_app,
                    "env": env,
                    "logs": logs,
                    "breaker": CircuitBreaker("iris-model", store=store),
                }
        finally:
            worker.stop()
            store.close()


@pytest.fixture
def fresh(stack: dict[str, Any]) -> dict[str, Any]:
    """No faults, fresh counts, a closed circuit."""
    stack["model"].clear_faults()
    stack["model"].reset_stats()
    stack["breaker"].reset()
    return stack


FEATURES = [5.1, 3.5, 1.4, 0.2]


@pytest.mark.resilience
def test_outage_loses_nothing_and_calls_nothing_twice(fresh: dict[str, Any]) -> None:
    """200 tasks, an outage in the middle: all succeed, the endpoint is spared meanwhile."""
    tasks, model = fresh["tasks"], fresh["model"]

    def send(count: int) -> list[Any]:
        return [
            (tasks.predict_parked if i % 2 else tasks.predict).delay(FEATURES) for i in range(count)
        ]

    results = send(40)
    wait_for(lambda: all(r.ready() for r in results), 60, "the first tasks")
    # The rest are sent once the outage has begun, however fast the workers are.
    model.phase("outage")
    model.faults(outage_seconds=3)
    results += send(160)
    wait_for(lambda: not model.stats()["down"], 30, "the outage to end")
    model.phase("recovery")
    answers = [r.get(timeout=120) for r in results]

    assert all(a["label"] == "setosa" and not is_fallback(a) for a in answers)
    stats = model.stats()
    assert stats["calls_after_success"] == 0
    outage = stats["phases"]["outage"]
    policy = tasks.app.conf.cbtasks_policy
    windows = math.ceil(3 / policy.open_seconds) + 1
    # The trip itself, calls already in flight in the other processes when it
    # tripped, then at most the probes of each half-open window.
    bound = policy.failure_threshold + (CONCURRENCY - 1) + policy.half_open_probes * windows
    assert outage["failed"] <= bound, outage
    assert stats["phases"]["recovery"]["peak_in_flight"] <= CONCURRENCY


def test_parked_traffic_alone_probes_and_recovers(fresh: dict[str, Any]) -> None:
    """With every request parked, released ones probe the endpoint: no deadlock."""
    tasks, model = fresh["tasks"], fresh["model"]
    model.faults(outage_seconds=3)
    results = [tasks.predict_parked.delay(FEATURES) for _ in range(60)]
    answers = [r.get(timeout=120) for r in results]
    assert all(a["label"] == "setosa" for a in answers)
    assert model.stats()["calls_after_success"] == 0


def test_grpc_task_rides_out_an_outage(fresh: dict[str, Any]) -> None:
    """The gRPC client inside a task, no glue code: failures defer, all succeed."""
    tasks, model = fresh["tasks"], fresh["model"]
    model.faults(outage_seconds=3)
    results = [tasks.predict_grpc.delay(FEATURES) for _ in range(30)]
    answers = [r.get(timeout=120) for r in results]
    assert all(a["label"] == "setosa" for a in answers)
    assert model.stats()["calls_after_success"] == 0


def test_invalid_payload_fails_the_task_not_the_breaker(fresh: dict[str, Any]) -> None:
    """A payload that fails validation is the caller's error: task fails, breaker untouched."""
    tasks = fresh["tasks"]
    bad = [tasks.predict.delay([1, "x"]) for _ in range(10)]
    for result in bad:
        with pytest.raises(Exception, match="features must"):
            result.get(timeout=30)
    status = fresh["breaker"].status()
    assert status is None or (status.state is State.CLOSED and status.consecutive_failures == 0)
    assert tasks.predict.delay(FEATURES).get(timeout=30)["label"] == "setosa"


def test_fallback_answers_at_once_and_is_marked(fresh: dict[str, Any]) -> None:
    """on_open='fallback': a marked default prediction, no endpoint call."""
    fresh["breaker"].force_open()
    answer = fresh["tasks"].predict_or_default.delay(FEATURES).get(timeout=30)
    assert is_fallback(answer)
    assert answer["cbtasks_fallback"] == "default"
    assert answer["result"] == {"label": "unknown", "probabilities": []}
    assert fresh["model"].stats()["requests"] == 0


def test_exhausted_deferrals_end_in_a_visible_failure(fresh: dict[str, Any]) -> None:
    """Past max_deferrals without a fallback: FAILURE with CircuitOpenError."""
    fresh["breaker"].force_open()
    result = fresh["tasks"].predict_impatient.delay(FEATURES)
    with pytest.raises(CircuitOpenError, match="gave up: 2 deferrals"):
        result.get(timeout=60, propagate=True)
    assert result.state == "FAILURE"


def test_deferrals_do_not_touch_the_tasks_own_retries(fresh: dict[str, Any]) -> None:
    """A task's self.retry() keeps its own count and max_retries, however often it is deferred."""
    tasks = fresh["tasks"]
    events = _EventLog(tasks.app)
    fresh["breaker"].force_open()
    result = tasks.retry_twice.delay()
    # More deferrals than the two retries it asks for: a deferral that counted
    # as a retry would leave it with retries >= 3 and no retry of its own.
    wait_for(lambda: events.count(result.id, "task-circuit_open") >= 3, 60, "three deferrals")
    fresh["breaker"].force_close()
    answer = result.get(timeout=60)
    assert answer["retries"] == 2
    assert answer["deferrals"] >= 3
    events.stop()


def test_a_deferred_task_keeps_its_parent_and_root(fresh: dict[str, Any]) -> None:
    """Deferring re-sends the same request: not a child of itself (Flower's Parent/Root)."""
    tasks = fresh["tasks"]
    events = _EventLog(tasks.app)
    fresh["breaker"].force_open()
    top = tasks.lineage.delay()
    child_of_another = tasks.lineage.apply_async(parent_id="parent-1", root_id="root-1")
    wait_for(lambda: events.count(top.id, "task-circuit_open") >= 2, 60, "two deferrals")
    fresh["breaker"].force_close()
    answer = top.get(timeout=60)
    assert answer["deferrals"] >= 2
    assert answer["parent_id"] is None, "a deferred top-level task became its own child"
    assert answer["root_id"] in (None, top.id)
    other = child_of_another.get(timeout=60)
    assert (other["parent_id"], other["root_id"]) == ("parent-1", "root-1")
    events.stop()


def test_after_recovery_an_operator_finds_which_tasks_waited_how_long_and_why(
    fresh: dict[str, Any],
) -> None:
    """Flower ends with SUCCESS; `cbtasks waited NAME` still says who waited, how long, why."""
    import json
    import subprocess
    import sys

    tasks = fresh["tasks"]
    events = _EventLog(tasks.app)
    fresh["breaker"].force_open()
    result = tasks.predict.delay(FEATURES)
    wait_for(lambda: events.count(result.id, "task-circuit_open") >= 2, 60, "two deferrals")
    fresh["breaker"].force_close()
    assert result.get(timeout=60)["label"] == "setosa"
    events.stop()
    shown = subprocess.run(
        [sys.executable, "-m", "cbtasks", "waited", "iris-model", "--json"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "CBTASKS_REDIS_URL": fresh["redis"].url},
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    entry = next(e for e in json.loads(shown.stdout) if e["task_id"] == result.id)
    assert entry["task"] == "workers.predict" and entry["mode"] == "countdown"
    assert entry["deferrals"] >= 2 and entry["waited_seconds"] > 0
    assert entry["reason"] == "forced open by an operator"
    table = subprocess.run(
        [sys.executable, "-m", "cbtasks", "waited", "iris-model"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "CBTASKS_REDIS_URL": fresh["redis"].url},
    ).stdout  # fmt: skip
    assert result.id in table and "forced open by an operator" in table


def test_a_completed_task_id_sent_again_does_not_call_the_endpoint(fresh: dict[str, Any]) -> None:
    """The completion guard, told to look at every message (completion_check="always"): the
    same task id a second time gets the stored result, no call. (By default it looks at
    the messages that may have run only: the resilience tests' kills and visibility
    timeouts redeliver, and count no second call.)"""
    tasks, model = fresh["tasks"], fresh["model"]
    events = _EventLog(tasks.app)
    # Events sent before the receiver listens are lost: wait until it hears one.
    wait_for(
        lambda: (
            events.count(tasks.predict.delay(FEATURES).id, "task-received") > 0
            or events.total("task-succeeded") > 0
        ),
        30,
        "the event receiver",
    )
    model.reset_stats()
    checked = tasks.predict_checked
    first = checked.apply_async((FEATURES,), task_id="same-request-1").get(timeout=30)
    wait_for(lambda: events.count("same-request-1", "task-succeeded") >= 1, 30, "the first run")
    checked.apply_async((FEATURES,), task_id="same-request-1")
    wait_for(lambda: events.count("same-request-1", "task-succeeded") >= 2, 30, "the second run")
    events.stop()
    assert first["label"] == "setosa"
    # The server counts a call whose request id (the task id) was answered before.
    assert model.stats()["calls_after_success"] == 0


def test_a_message_held_past_half_the_visibility_timeout_is_checked(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    """By default the guard reads nothing for a fresh message, but one the worker held past
    half the visibility timeout may have been delivered again meanwhile, and that copy may
    have run: it looks. One process holding three messages (prefetch 4) behind a 3.5 s call,
    with a 6 s visibility timeout: the second, whose id already succeeded (as its other copy
    would have), is answered from the backend, not called."""
    model, tasks = stack["model"], stack["tasks"]
    model.clear_faults()
    stack["breaker"].reset()
    env = {**stack["env"], "CBTASKS_VISIBILITY_TIMEOUT": "6"}
    worker = CeleryWorker(
        env, app=APP, concurrency=1, prefetch_multiplier=4, queues="held", name="held",
        log_path=tmp_path / "w.log",
    )  # fmt: skip
    worker.start()
    try:
        # Started: it answers one request before the test's own.
        assert tasks.predict.apply_async((FEATURES,), queue="held").get(timeout=60)
        model.reset_stats()
        model.faults(latency_ms=3500)
        with warnings.catch_warnings():  # Celery's Redis backend still calls setex
            warnings.simplefilter("ignore", DeprecationWarning)
            tasks.app.backend.store_result(
                "ran-elsewhere", {"label": "from its other copy"}, "SUCCESS"
            )
        first = tasks.predict.apply_async((FEATURES,), queue="held")
        tasks.predict.apply_async((FEATURES,), queue="held", task_id="ran-elsewhere")
        last = tasks.predict.apply_async((FEATURES,), queue="held")
        # One process takes them in order: when the last is done, the second has run.
        assert first.get(timeout=60)["label"] == "setosa"
        assert last.get(timeout=60)["label"] == "setosa"
        assert AsyncResult("ran-elsewhere", app=tasks.app).get(timeout=10) == {
            "label": "from its other copy"
        }
        assert model.stats()["requests"] == 2, "the held message called the endpoint"
    finally:
        model.clear_faults()
        worker.stop()


def test_an_expired_parked_request_is_revoked_while_the_circuit_stays_open(
    fresh: dict[str, Any],
) -> None:
    """Parked with expires=2: REVOKED when it expires, not held until the circuit closes."""
    fresh["breaker"].force_open()
    result = fresh["tasks"].predict_parked.apply_async((FEATURES,), expires=2)
    wait_for(lambda: _state(result) == "REVOKED", 30, "the expired request to be revoked")
    assert fresh["breaker"].state is State.OPEN
    assert fresh["model"].stats()["requests"] == 0


def test_a_waiting_client_sees_circuit_open_not_pending(fresh: dict[str, Any]) -> None:
    """While deferred, the result backend says CIRCUIT_OPEN and why; then SUCCESS."""
    fresh["breaker"].force_open()
    for task in (fresh["tasks"].predict, fresh["tasks"].predict_parked):
        result = task.delay(FEATURES)
        wait_for(lambda r=result: _state(r) == "CIRCUIT_OPEN", 30, "CIRCUIT_OPEN")
        info = result.info
        assert info["breaker"] == "iris-model"
        assert info["deferrals"] >= 1
        assert info["mode"] in ("countdown", "park")
        assert "forced open" in info["reason"] or "open" in info["reason"]
    fresh["breaker"].force_close()
    assert result.get(timeout=60)["label"] == "setosa"
    assert _state(result) == "SUCCESS"


def test_registration_rejects_unknown_options() -> None:
    """An unknown on_open or defer fails when the task is registered, not when it runs."""
    from cbtasks import CircuitBreakerTask

    def predict() -> None:
        """A task that must never be registered."""

    for options in ({"on_open": "explode"}, {"defer": "later"}, {"on_open": "fallback"}):
        app = Celery("registration", set_as_current=False)
        with pytest.raises(PolicyError, match=next(iter(options))):
            app.task(base=CircuitBreakerTask, shared=False, **options)(predict)
            app.finalize(auto=True)  # a lazy app builds its tasks here


def test_killed_probe_gives_its_slot_back(stack: dict[str, Any], tmp_path: Path) -> None:
    """A worker SIGKILLed while holding a probe: the lease runs out, the breaker recovers."""
    model, tasks = stack["model"], stack["tasks"]
    model.clear_faults()
    breaker = CircuitBreaker("slow-probe-model", store=stack["breaker"].store)
    breaker.reset()
    env = {**stack["env"], "CBTASKS_VISIBILITY_TIMEOUT": "5"}
    worker = CeleryWorker(
        env, app=APP, concurrency=1, queues="probes", name="probe", log_path=tmp_path / "w.log"
    )
    worker.start()
    try:
        model.faults(latency_ms=60_000)  # the probe will hang
        breaker.force_open()
        breaker.enable()  # open, probing after 0.5 s
        result = tasks.predict_short_lease.apply_async((FEATURES,), queue="probes")
        wait_for(
            lambda: (s := breaker.status()) is not None and s.probes_in_use == 1, 30, "a probe"
        )
        worker.kill()
        model.clear_faults()
        wait_for(lambda: breaker.status().probes_in_use == 0, 10, "the lease to run out")  # type: ignore[union-attr]
        worker = CeleryWorker(
            env,
            app=APP,
            concurrency=1,
            queues="probes",
            name="probe2",
            log_path=tmp_path / "w2.log",
        ).start()
        assert result.get(timeout=60)["label"] == "setosa"
        assert breaker.state is State.CLOSED
    finally:
        worker.stop()


def test_short_visibility_timeout_causes_no_duplicates(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    """An outage longer than the broker's visibility timeout: nothing runs twice."""
    model, tasks = stack["model"], stack["tasks"]
    model.clear_faults()
    model.reset_stats()
    stack["breaker"].reset()
    env = {**stack["env"], "CBTASKS_VISIBILITY_TIMEOUT": "2"}
    worker = CeleryWorker(
        env, app=APP, concurrency=2, queues="short", name="short", log_path=tmp_path / "w.log"
    )
    worker.start()
    try:
        model.faults(outage_seconds=5)
        results = [tasks.predict.apply_async((FEATURES,), queue="short") for _ in range(30)]
        answers = [r.get(timeout=120) for r in results]
        assert all(a["label"] == "setosa" for a in answers)
        assert model.stats()["calls_after_success"] == 0
    finally:
        worker.stop()


class _EventLog:
    """Task events as Flower receives them, captured in a thread."""

    def __init__(self, app: Celery) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()
        self._connection = app.connection()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self._on_event})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _on_event(self, event: dict[str, Any]) -> None:
        self.seen[(event.get("uuid", ""), event["type"])] += 1

    def _run(self) -> None:
        try:
            self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except Exception:  # the connection closed at stop()
            return

    def count(self, task_id: str, kind: str) -> int:
        return self.seen[(task_id, kind)]

    def total(self, kind: str) -> int:
        return sum(n for (_, seen_kind), n in self.seen.items() if seen_kind == kind)

    def stop(self) -> None:
        self._receiver.should_stop = True
        self._connection.release()


def _state(result: AsyncResult) -> str:
    return str(result.state)


def test_parked_requests_survive_restarts_and_run_once(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    """300 requests parked in Redis, the worker restarted, two workers release: each runs once."""
    from cbtasks.stores._parking import ParkingLot

    model, tasks = stack["model"], stack["tasks"]
    model.clear_faults()
    model.reset_stats()
    breaker = stack["breaker"]
    breaker.reset()
    breaker.force_open()
    lot = ParkingLot(breaker.store.client, "cbtasks", "iris-model")
    env = stack["env"]
    first = CeleryWorker(
        env, app=APP, concurrency=2, queues="parking", name="p1", log_path=tmp_path / "1.log"
    )
    first.start()
    try:
        results = [
            tasks.predict_parked.apply_async((FEATURES,), queue="parking") for _ in range(300)
        ]
        wait_for(lambda: lot.count() == 300, 60, "300 parked requests")
    finally:
        first.stop()
    assert model.stats()["requests"] == 0
    breaker.force_close()
    workers = [
        CeleryWorker(
            env,
            app=APP,
            concurrency=2,
            queues="parking",
            name=f"r{i}",
            log_path=tmp_path / f"r{i}.log",
        )
        for i in range(2)
    ]
    for worker in workers:
        worker.start()
    try:
        answers = [r.get(timeout=120) for r in results]
    finally:
        for worker in workers:
            worker.stop()
    assert all(a["label"] == "setosa" for a in answers)
    stats = model.stats()
    assert stats["requests"] == 300 and stats["calls_after_success"] == 0
    assert lot.count() == 0


RABBITMQ_URL = os.environ.get("CBTASKS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _rabbitmq_reachable() -> bool:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(RABBITMQ_URL)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), 2):
            return True
    except OSError:
        return False


@pytest.mark.resilience
def test_outage_with_rabbitmq_as_broker(stack: dict[str, Any], tmp_path: Path) -> None:
    """The same task rides out an outage with RabbitMQ as its broker."""
    if not _rabbitmq_reachable():
        pytest.skip(
            f"no RabbitMQ at {RABBITMQ_URL} (set CBTASKS_TEST_RABBITMQ_URL); CI here has one"
        )
    model = stack["model"]
    model.clear_faults()
    model.reset_stats()
    stack["breaker"].reset()
    queue = f"cbtasks-test-{os.getpid()}"
    env = {**stack["env"], "CBTASKS_BROKER_URL": RABBITMQ_URL}
    client = Celery(
        "rabbit-client", broker=RABBITMQ_URL, backend=stack["redis"].url, set_as_current=False
    )
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    worker = CeleryWorker(
        env, app=APP, concurrency=2, queues=queue, name="rabbit", log_path=tmp_path / "w.log"
    )
    worker.start()
    try:
        model.faults(outage_seconds=3)
        results = [client.send_task("workers.predict", (FEATURES,), queue=queue) for _ in range(40)]
        answers = [r.get(timeout=120) for r in results]
        assert all(a["label"] == "setosa" for a in answers)
        assert model.stats()["calls_after_success"] == 0
    finally:
        worker.stop()
        with client.connection() as connection:
            connection.default_channel.queue_delete(queue)
