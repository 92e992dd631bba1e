"""defer="pause": the fleet stops taking a breaker's queue while its circuit is open.

The gate on its own (a real Redis, a consumer that records what it is told),
then real workers: messages wait in the broker while open and run once after.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from cbtasks import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitBreakerTask,
    EndpointFailure,
    PolicyError,
    RedisStore,
)
from cbtasks._testing.processes import CeleryWorker, ModelServer, client_app
from cbtasks._testing.redis_server import RedisServer
from cbtasks.ops._fleet import paused_workers
from cbtasks.task import _pause
from cbtasks.task._pause import QueueGate, check_pause_queues
from tests.conftest import wait_for

POLICY = BreakerPolicy(failure_threshold=1, open_seconds=300, half_open_probes=1)


def down() -> None:
    raise EndpointFailure("503")


class Switches:
    """What a gate told the consumer, in order."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def __call__(self, mode: str) -> None:
        self.told.append(mode)


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    with RedisStore(redis_url) as store:
        yield store


def gate_for(store: RedisStore, name: str, host: str = "w1@host") -> tuple[QueueGate, Switches]:
    switches = Switches()
    breaker = CircuitBreaker(name, policy=POLICY, store=store)
    return QueueGate("q", breaker, switches, host, rand=lambda: 0.0), switches


def test_open_pauses_and_close_resumes(store: RedisStore, name: str) -> None:
    """Open: stop consuming, noted for operators; closed: consume again, the note gone."""
    gate, switches = gate_for(store, name)
    gate.reconcile()
    assert switches.told == [] and gate.consuming  # no state yet: consume
    gate.breaker.force_open()
    gate.reconcile()
    assert switches.told == ["pause"]
    assert paused_workers(store, name) == 1
    gate.reconcile()
    assert switches.told == ["pause"]  # level-triggered: told once
    gate.breaker.force_close()
    gate.reconcile()
    assert switches.told == ["pause", "consume"]
    assert paused_workers(store, name) == 0


def test_shadow_mode_and_an_unreachable_redis_keep_consuming(name: str) -> None:
    """Disabled (shadow mode) admits every call; Redis away: each task's breaker decides."""
    with RedisServer() as own, RedisStore(own.url) as store:
        gate, switches = gate_for(store, name)
        gate.breaker.force_open()
        gate.breaker.disable()
        gate.reconcile()
        assert switches.told == []
        gate.breaker.enable()
        gate.breaker.force_open()
        gate.reconcile()
        assert switches.told == ["pause"]
        own.stop()
        gate.reconcile()
        assert switches.told == ["pause", "consume"]


def test_one_worker_of_the_fleet_consumes_while_half_open(store: RedisStore, name: str) -> None:
    """The probes must come from real requests: one worker, under a lease, takes them."""
    first, first_told = gate_for(store, name, "w1@host")
    second, second_told = gate_for(store, name, "w2@host")
    with pytest.raises(EndpointFailure):
        first.breaker.call(down)  # a trip: open
    for gate in (first, second):
        gate.reconcile()
    first.breaker.health_passed()  # open -> half-open
    for _ in range(3):  # the holder renews its lease; the other stays paused
        first.reconcile()
        second.reconcile()
    # The lease holder takes only the probes (its prefetch cut to the budget).
    assert first_told.told == ["pause", "probe"]
    assert second_told.told == ["pause"]
    first.breaker.force_close()
    first.reconcile()
    second.reconcile()
    assert first_told.told == ["pause", "probe", "consume"]
    assert second_told.told == ["pause", "consume"]


def test_news_wakes_the_gate(
    store: RedisStore, redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trip made by another process is acted on at once, not at the next re-check."""
    monkeypatch.setattr(_pause, "RECHECK_SECONDS", 60.0)
    gate, switches = gate_for(store, name)
    gate.start()
    try:
        wait_for(lambda: store.news._listener is not None, 5, "the news listener")
        wait_for(lambda: store.news._listener.subscriptions > 0, 5, "the subscription")
        with RedisStore(redis_url) as other:
            CircuitBreaker(name, policy=POLICY, store=other).force_open()
        wait_for(lambda: switches.told == ["pause"], 5, "the gate to pause on news")
    finally:
        gate.stop()


def test_the_recheck_covers_lost_news(
    store: RedisStore, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no news at all, the slow re-check still finds the open circuit."""
    monkeypatch.setattr(_pause, "RECHECK_SECONDS", 0.1)
    gate, switches = gate_for(store, name)
    monkeypatch.setattr(store, "add_news_hook", lambda hook: None)  # news never arrives
    gate.start()
    try:
        gate.breaker.force_open()
        wait_for(lambda: switches.told == ["pause"], 5, "the re-check to pause")
        gate.breaker.force_close()
        wait_for(lambda: switches.told == ["pause", "consume"], 5, "the re-check to resume")
    finally:
        gate.stop()


def _only_this_tests_tasks_share_queues(app: Celery) -> None:
    """Shared tasks of other test modules join every app (tests.predict_paused among
    them, which pauses its queue): give each of them a queue of its own."""
    app.conf.task_routes = {
        **{name: f"elsewhere:{name}" for name in app.tasks if not name.startswith(__name__)},
        **app.conf.task_routes,
    }


def test_a_queue_shared_with_another_breakers_task_is_refused() -> None:
    """Pausing the queue would stop a task that is not the breaker's: the worker refuses,
    naming the tasks and the queue."""
    app = Celery("pause-shared", set_as_current=False)
    app.conf.cbtasks_redis_url = "redis://127.0.0.1:1/0"
    app.conf.task_routes = {f"tests.test_pause.{n}": "gpu" for n in ("generate", "embed")}
    app.conf.task_routes["tests.test_pause.housekeeping"] = "gpu"

    @app.task(base=CircuitBreakerTask, shared=False, breaker="llm", defer="pause")
    def generate() -> None:
        """Pauses the gpu queue while llm's circuit is open."""

    @app.task(base=CircuitBreakerTask, shared=False, breaker="embedder")
    def embed() -> None:
        """Another breaker's task on the same queue."""

    @app.task(shared=False)
    def housekeeping() -> None:
        """A plain task on the same queue."""

    app.finalize(auto=True)
    _only_this_tests_tasks_share_queues(app)
    with pytest.raises(PolicyError) as refused:
        check_pause_queues(app)
    message = str(refused.value)
    assert "queue 'gpu' belongs to breaker 'llm'" in message
    assert "embed" in message and "housekeeping" in message


def test_tasks_sharing_the_breaker_may_share_its_queue() -> None:
    """Every task on the queue with the same breaker: nothing to refuse."""
    app = Celery("pause-ok", set_as_current=False)
    # Shared tasks of other test modules join every app: route only this test's.
    app.conf.task_routes = {f"tests.test_pause.{n}": "gpu" for n in ("generate", "summarize")}

    @app.task(base=CircuitBreakerTask, shared=False, breaker="llm", defer="pause")
    def generate() -> None:
        """Pauses the gpu queue."""

    @app.task(base=CircuitBreakerTask, shared=False, breaker="llm")
    def summarize() -> None:
        """Same breaker, same queue."""

    app.finalize(auto=True)
    _only_this_tests_tasks_share_queues(app)
    check_pause_queues(app)


def test_a_request_in_hand_is_deferred_by_its_pause_in_hand_mode() -> None:
    """What a process already holds when the circuit opens: countdown or park, as chosen."""
    app = Celery("pause-in-hand", set_as_current=False)

    @app.task(base=CircuitBreakerTask, shared=False, defer="pause")
    def by_countdown() -> None:
        """The default."""

    @app.task(base=CircuitBreakerTask, shared=False, defer="pause", pause_in_hand="park")
    def by_park() -> None:
        """Parked."""

    app.finalize(auto=True)
    assert by_countdown._deferral_mode() == "countdown"
    assert by_park._deferral_mode() == "park"

    def dropped() -> None:
        """Must never be registered."""

    with pytest.raises(PolicyError, match="pause_in_hand must be one of countdown, park"):
        app.task(base=CircuitBreakerTask, shared=False, defer="pause", pause_in_hand="drop")(
            dropped
        )
        app.finalize(auto=True)


# -- real workers ------------------------------------------------------------------------

FEATURES = [5.1, 3.5, 1.4, 0.2]
QUEUE = "pause-model"


@pytest.fixture(scope="module")
def pause_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("pause")
    with RedisServer() as redis_server, ModelServer() as model:
        env = {"CBTASKS_REDIS_URL": redis_server.url, "CBTASKS_MODEL_URL": model.url}
        store = RedisStore(redis_server.url)
        try:
            yield {"redis": redis_server, "model": model, "env": env, "store": store, "logs": logs}
        finally:
            store.close()


def pause_worker(
    fleet: dict[str, Any], name: str, concurrency: int = 2, **env: str
) -> CeleryWorker:
    """A worker of the test app consuming only the paused queue (not started)."""
    return CeleryWorker(
        {**fleet["env"], **env},
        concurrency=concurrency,
        queues=QUEUE,
        name=name,
        log_path=fleet["logs"] / f"{name}.log",
        app="tests.worker_tasks",
    )


def queued(url: str) -> int:
    return int(redis.Redis.from_url(url).llen(QUEUE))


def test_a_paused_worker_leaves_the_messages_in_the_broker(pause_fleet: dict[str, Any]) -> None:
    """Open: the worker takes nothing from the queue (no endpoint call, no re-publish);
    closed: it takes them all, each run once."""
    url, model = pause_fleet["redis"].url, pause_fleet["model"]
    model.clear_faults()
    breaker = CircuitBreaker("pause-model", store=pause_fleet["store"])
    breaker.reset()
    worker = pause_worker(pause_fleet, "pause1")
    worker.start()
    try:
        app = client_app(url)
        first = app.send_task("tests.predict_paused", (FEATURES,), queue=QUEUE)
        assert first.get(timeout=60)["label"] == "setosa"
        breaker.force_open()
        wait_for(lambda: paused_workers(pause_fleet["store"], "pause-model") == 1, 10, "pause")
        calls_before = model.stats()["requests"]
        results = [
            app.send_task("tests.predict_paused", (FEATURES,), queue=QUEUE) for _ in range(10)
        ]
        wait_for(lambda: queued(url) == 10, 10, "the ten to wait in the queue")
        assert model.stats()["requests"] == calls_before
        breaker.force_close()
        assert all(r.get(timeout=60)["label"] == "setosa" for r in results)
        assert queued(url) == 0
        assert paused_workers(pause_fleet["store"], "pause-model") == 0
        assert model.stats()["calls_after_success"] == 0
    finally:
        worker.stop()


def test_a_worker_started_as_the_docs_write_it_runs_the_paused_tasks(
    pause_fleet: dict[str, Any],
) -> None:
    """`celery -A app worker`, no -Q, as the docs and the compose file start it: the queue
    task_routes gives a pause-mode task is consumed too (it stayed PENDING for ever), and
    it pauses and resumes with its circuit."""
    url = pause_fleet["redis"].url
    breaker = CircuitBreaker("pause-model", store=pause_fleet["store"])
    breaker.reset()
    worker = CeleryWorker(
        pause_fleet["env"],
        concurrency=2,
        queues=None,  # no -Q
        name="as-documented",
        log_path=pause_fleet["logs"] / "as-documented.log",
        app="tests.worker_tasks",
    ).start()
    try:
        app = client_app(url)
        first = app.send_task("tests.predict_paused", (FEATURES,), queue=QUEUE)
        assert first.get(timeout=60)["label"] == "setosa"
        breaker.force_open()
        wait_for(lambda: paused_workers(pause_fleet["store"], "pause-model") == 1, 10, "pause")
        later = app.send_task("tests.predict_paused", (FEATURES,), queue=QUEUE)
        wait_for(lambda: queued(url) == 1, 10, "the request to wait in the queue")
        breaker.force_close()
        assert later.get(timeout=60)["label"] == "setosa"
    finally:
        worker.stop()


def test_a_worker_started_while_open_takes_nothing(pause_fleet: dict[str, Any]) -> None:
    """The gate decides before the event loop runs: nothing is taken, then all once closed."""
    url = pause_fleet["redis"].url
    breaker = CircuitBreaker("pause-model", store=pause_fleet["store"])
    breaker.reset()
    breaker.force_open()
    app = client_app(url)
    results = [app.send_task("tests.predict_paused", (FEATURES,), queue=QUEUE) for _ in range(5)]
    worker = pause_worker(pause_fleet, "pause2")
    worker.start()
    try:
        wait_for(lambda: paused_workers(pause_fleet["store"], "pause-model") == 1, 30, "pause")
        assert queued(url) == 5
        breaker.force_close()
        assert all(r.get(timeout=60)["label"] == "setosa" for r in results)
    finally:
        worker.stop()


def test_a_worker_killed_while_paused_loses_nothing(pause_fleet: dict[str, Any]) -> None:
    """A worker SIGKILLed with a request in hand while the fleet is paused: the request
    comes back to the queue (kombu restores unacked messages only from a channel that
    consumes something: the paused worker consumes cbtasks.restore meanwhile), waits
    there while open, and runs once the circuit closes."""
    url, model, store = pause_fleet["redis"].url, pause_fleet["model"], pause_fleet["store"]
    breaker = CircuitBreaker("pause-model", store=store)
    breaker.reset()
    model.clear_faults()
    model.faults(latency_ms=8000)
    short = {"CBTASKS_VISIBILITY_TIMEOUT": "3"}
    holder = pause_worker(pause_fleet, "holder", concurrency=1, **short)
    survivor = pause_worker(pause_fleet, "survivor", concurrency=1, **short)
    holder.start()
    try:
        requests_before = model.stats()["requests"]
        result = client_app(url).send_task("tests.predict_paused", (FEATURES,), queue=QUEUE)
        wait_for(lambda: model.stats()["requests"] > requests_before, 30, "the call in flight")
        survivor.start()
        breaker.force_open()
        wait_for(lambda: paused_workers(store, "pause-model") == 2, 30, "both paused")
        holder.kill()
        wait_for(lambda: queued(url) == 1, 30, "the killed worker's request back in the queue")
        model.clear_faults()
        breaker.force_close()
        assert result.get(timeout=60)["label"] == "setosa"
        assert queued(url) == 0
    finally:
        holder.stop()
        survivor.stop()
        model.clear_faults()


def test_pause_with_rabbitmq_as_broker(pause_fleet: dict[str, Any]) -> None:
    """basic.cancel on RabbitMQ: while open the messages wait in the queue, then run once."""
    from tests.test_task_e2e import RABBITMQ_URL, _rabbitmq_reachable

    if not _rabbitmq_reachable():
        pytest.skip(f"no RabbitMQ at {RABBITMQ_URL} (set CBTASKS_TEST_RABBITMQ_URL); CI has one")
    store = pause_fleet["store"]
    breaker = CircuitBreaker("pause-model", store=store)
    breaker.reset()
    pause_fleet["model"].clear_faults()
    client = Celery(
        "rabbit-pause", broker=RABBITMQ_URL, backend=pause_fleet["redis"].url, set_as_current=False
    )
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")

    def waiting() -> int:
        with client.connection() as connection:
            return int(connection.default_channel.queue_declare(QUEUE, passive=True).message_count)

    with client.connection() as connection:  # what an earlier run may have left
        connection.default_channel.queue_declare(QUEUE, durable=True, auto_delete=False)
        connection.default_channel.queue_purge(QUEUE)
    worker = pause_worker(pause_fleet, "rabbitpause", CBTASKS_BROKER_URL=RABBITMQ_URL)
    worker.start()
    try:
        first = client.send_task("tests.predict_paused", (FEATURES,), queue=QUEUE)
        assert first.get(timeout=60)["label"] == "setosa"
        breaker.force_open()
        wait_for(lambda: paused_workers(store, "pause-model") == 1, 30, "the pause")
        results = [
            client.send_task("tests.predict_paused", (FEATURES,), queue=QUEUE) for _ in range(8)
        ]
        wait_for(lambda: waiting() == 8, 10, "the eight to wait in RabbitMQ")
        breaker.force_close()
        assert all(r.get(timeout=60)["label"] == "setosa" for r in results)
        assert waiting() == 0
    finally:
        worker.stop()
        with client.connection() as connection:
            connection.default_channel.queue_delete(QUEUE)


def test_a_shared_queue_stops_the_worker_at_start() -> None:
    """The check runs at worker_init: the worker refuses to start, saying why."""
    from types import SimpleNamespace

    from cbtasks.task._task import _check_options

    app = Celery("pause-refused", set_as_current=False)
    app.conf.cbtasks_redis_url = "redis://127.0.0.1:1/0"
    app.conf.task_routes = {f"tests.test_pause.{n}": "gpu" for n in ("generate", "cleanup")}

    @app.task(base=CircuitBreakerTask, shared=False, breaker="llm", defer="pause")
    def generate() -> None:
        """Pauses the gpu queue."""

    @app.task(shared=False)
    def cleanup() -> None:
        """Not the breaker's."""

    app.finalize(auto=True)
    _only_this_tests_tasks_share_queues(app)
    with pytest.raises(SystemExit, match="queue 'gpu' belongs to breaker 'llm'"):
        _check_options(sender=SimpleNamespace(app=app))
    assert not any(step.__name__ == "PauseQueues" for step in app.steps["consumer"])


def test_a_call_in_flight_when_it_opens_finishes_and_the_rest_wait(
    pause_fleet: dict[str, Any],
) -> None:
    """The circuit opens while a slow call runs: it finishes, the requests behind it stay in
    the paused queue (whatever the worker held meets the open circuit and is deferred back
    there by countdown), and all run once after the close; `cbtasks status` counts the
    paused worker meanwhile."""
    from cbtasks.ops.cli import status_rows

    url, model, store = pause_fleet["redis"].url, pause_fleet["model"], pause_fleet["store"]
    breaker = CircuitBreaker("pause-model", store=store)
    breaker.reset()
    model.clear_faults()
    model.reset_stats()
    model.faults(latency_ms=1500)
    worker = pause_worker(pause_fleet, "inhand", concurrency=1)
    worker.start()
    try:
        app = client_app(url)
        warm = app.send_task("tests.predict_paused", (FEATURES,), queue=QUEUE)
        assert warm.get(timeout=60)["label"] == "setosa"
        requests = model.stats()["requests"]
        results = [
            app.send_task("tests.predict_paused", (FEATURES,), queue=QUEUE) for _ in range(3)
        ]
        wait_for(lambda: model.stats()["requests"] > requests, 30, "the first call in flight")
        breaker.force_open()
        wait_for(lambda: paused_workers(store, "pause-model") == 1, 10, "the pause")
        row = next(r for r in status_rows(store) if r["name"] == "pause-model")
        assert row["paused_workers"] == 1
        wait_for(lambda: queued(url) == 2, 30, "the two not yet run, waiting in the queue")
        model.clear_faults()
        breaker.force_close()
        assert all(r.get(timeout=60)["label"] == "setosa" for r in results)
        assert model.stats()["calls_after_success"] == 0
    finally:
        worker.stop()
        model.clear_faults()


def test_prefetched_messages_meet_the_open_circuit_and_go_back_to_the_paused_queue(
    pause_fleet: dict[str, Any],
) -> None:
    """One process with a prefetch of 4 holds three messages behind a slow call when the
    circuit opens: the call finishes, the three are deferred by countdown into the paused
    queue (no endpoint call, nothing left in the worker's hand), and after the close each
    of the four has run once."""
    url, model, store = pause_fleet["redis"].url, pause_fleet["model"], pause_fleet["store"]
    broker = redis.Redis.from_url(url)
    breaker = CircuitBreaker("pause-model", store=store)
    breaker.reset()
    model.clear_faults()
    worker = CeleryWorker(
        pause_fleet["env"], concurrency=1, prefetch_multiplier=4, queues=QUEUE,
        name="prefetch", log_path=pause_fleet["logs"] / "prefetch.log", app="tests.worker_tasks",
    )  # fmt: skip
    worker.start()
    try:
        app = client_app(url)
        warm = app.send_task("tests.predict_paused", (FEATURES,), queue=QUEUE)
        assert warm.get(timeout=60)["label"] == "setosa"
        model.reset_stats()
        model.faults(latency_ms=2000)
        results = [
            app.send_task("tests.predict_paused", (FEATURES,), queue=QUEUE) for _ in range(4)
        ]
        # kombu keeps what a worker holds, unacknowledged, in the "unacked" hash.
        wait_for(
            lambda: queued(url) == 0 and broker.hlen("unacked") == 4 and model.stats()["in_flight"],
            30,
            "the first call in flight and the other three prefetched",
            seen=lambda: (queued(url), broker.hlen("unacked"), model.stats()),
        )
        breaker.force_open()
        wait_for(
            lambda: queued(url) == 3 and broker.hlen("unacked") == 0,
            30,
            "the three held back in the paused queue, the worker holding nothing",
            seen=lambda: (queued(url), broker.hlen("unacked")),
        )
        assert model.stats()["requests"] == 1
        model.clear_faults()
        breaker.force_close()
        assert all(r.get(timeout=60)["label"] == "setosa" for r in results)
        stats = model.stats()
        assert stats["requests"] == 4 and stats["calls_after_success"] == 0
    finally:
        worker.stop()
        model.clear_faults()


def test_the_half_open_consumer_takes_only_the_probe_budget() -> None:
    """While a worker is the fleet's half-open consumer its prefetch is cut to the probes;
    the cut is undone by what it took, so ETA messages held meanwhile keep their count."""
    from types import SimpleNamespace

    from kombu.common import QoS

    from cbtasks.task._pause import CONSUME, PAUSE, PROBE, PrefetchCut, _apply

    told: list[int] = []
    queues: list[str] = []
    consumer = SimpleNamespace(
        qos=QoS(lambda prefetch_count: told.append(prefetch_count), 4),
        add_task_queue=queues.append,
        cancel_task_queue=lambda q: queues.append(f"-{q}"),
        task_consumer=SimpleNamespace(consuming_from=lambda q: False),
    )
    consumed: set[str] = set()
    cut = PrefetchCut()
    _apply(consumer, "q", PROBE, 2, consumed, False, cut)
    assert consumer.qos.value == 2 and told[-1] == 2 and queues == ["q"]
    consumer.qos.increment_eventually(1)  # a countdown message arrives and is held
    _apply(consumer, "q", CONSUME, 2, consumed, False, cut)
    assert consumer.qos.value == 5  # the worker's 4, plus the message it holds
    _apply(consumer, "q", PROBE, 2, consumed, False, cut)
    _apply(consumer, "q", PAUSE, 2, consumed, False, cut)
    assert consumer.qos.value == 5 and queues[-1] == "-q"


def test_a_restarted_consumer_gets_its_own_prefetch_back() -> None:
    """The half-open consumer's cut is the gate's: the bootstep's stop (a broker reconnect
    restarts the consumer) gives it back, and a fresh QoS is never raised by the old cut;
    the gates' news hooks go with them."""
    from types import SimpleNamespace

    from kombu.common import QoS

    from cbtasks.task._pause import PROBE, PauseQueues, PrefetchCut, QueueGate, _apply

    def consumer() -> SimpleNamespace:
        return SimpleNamespace(
            qos=QoS(lambda prefetch_count: None, 4),
            add_task_queue=lambda q: None,
            cancel_task_queue=lambda q: None,
            task_consumer=SimpleNamespace(consuming_from=lambda q: False),
        )

    hooks: list[object] = []
    store = SimpleNamespace(
        prefix="cbtasks",
        add_news_hook=hooks.append,
        remove_news_hook=hooks.remove,
        client=SimpleNamespace(zrem=lambda *args: None),
    )
    breaker = SimpleNamespace(
        name="restart-model", store=store, policy=BreakerPolicy(half_open_probes=1)
    )
    old = consumer()
    gate = QueueGate("q", breaker, lambda mode: None, "w1")
    gate._run = lambda: None  # type: ignore[method-assign]  # no thread work: the steps
    gate.start()
    assert len(hooks) == 1
    _apply(old, "q", PROBE, 1, set(), False, gate.prefetch)
    assert old.qos.value == 1
    step = PauseQueues.__new__(PauseQueues)
    step.gates = [gate]
    step.stop(old)
    assert old.qos.value == 4 and hooks == []
    fresh = consumer()  # what Celery builds when the consumer restarts
    gate.prefetch.undo(fresh)
    PrefetchCut().undo(fresh)
    assert fresh.qos.value == 4


def test_flower_shows_the_paused_queue_gone_from_the_workers_queues(
    pause_fleet: dict[str, Any], tmp_path: Any
) -> None:
    """A real Flower: the worker's active queues (its worker page, /api/workers) lose the
    breaker's queue while the circuit is open and get it back once closed."""
    import httpx

    from cbtasks._testing.processes import Flower

    breaker = CircuitBreaker("pause-model", store=pause_fleet["store"])
    breaker.reset()
    worker = pause_worker(pause_fleet, "flowerpause")
    worker.start()
    flower = Flower(pause_fleet["env"]).start(log_path=tmp_path / "flower.log")
    try:

        def queues() -> set[str] | None:
            response = httpx.get(
                f"{flower.url}/api/workers", params={"refresh": 1}, auth=flower.auth, timeout=10
            )
            for name, info in response.json().items():
                if name.startswith("flowerpause@"):
                    return {q["name"] for q in info.get("active_queues") or []}
            return None

        wait_for(lambda: queues() == {QUEUE}, 30, "Flower to see the worker consume", queues)
        breaker.force_open()
        wait_for(lambda: queues() == {"cbtasks.restore"}, 30, "Flower to see it paused", queues)
        breaker.force_close()
        wait_for(lambda: queues() == {QUEUE}, 30, "Flower to see it consume again", queues)
    finally:
        flower.stop()
        worker.stop()


def test_the_half_open_lease_is_never_extended_for_another_worker(redis_url: str) -> None:
    """Worker A's lease runs out and B takes it in the instant A looks: A must not extend
    B's lease and believe it holds it too (two half-open consumers). Taking and renewing
    is one script; this reproduces the interleaving a GET then PEXPIRE allowed."""
    from cbtasks.task._pause import PROBE_LEASE_SECONDS, QueueGate

    store = RedisStore(redis_url)
    breaker = CircuitBreaker("lease-model", store=store)
    a = QueueGate("q", breaker, lambda mode: None, "worker-a")
    b = QueueGate("q", breaker, lambda mode: None, "worker-b")
    assert a._hold_probe_lease()
    key = a._lease_key
    client = store.client
    real_get = client.get

    def get_while_b_takes_it(name: object) -> object:
        value = real_get(name)
        client.delete(key)  # A's lease ran out ...
        assert b._hold_probe_lease()  # ... and B took it, between A's two commands
        return value

    client.get = get_while_b_takes_it  # type: ignore[method-assign]
    client.delete(key)
    client.set(key, "worker-a", px=int(PROBE_LEASE_SECONDS * 1000))
    try:
        a_holds = a._hold_probe_lease()
    finally:
        client.get = real_get  # type: ignore[method-assign]
    holder = client.get(key)
    store.close()
    assert not (a_holds and holder == b"worker-b"), "two half-open consumers"


def test_the_fleet_resumes_spread_over_the_jitter() -> None:
    """A close reaches every worker at once: each waits its own random share of
    RESUME_JITTER_SECONDS before it consumes again (the draw, not pinned at 0, is used)."""
    from types import SimpleNamespace

    from cbtasks.task._pause import CONSUME, PAUSE, RESUME_JITTER_SECONDS, QueueGate

    store = SimpleNamespace(
        prefix="cbtasks", client=SimpleNamespace(zrem=lambda *a: None, zadd=lambda *a: None)
    )
    breaker = SimpleNamespace(name="jitter-model", store=store, policy=BreakerPolicy())
    waits: list[float] = []
    for draw in (0.25, 0.75):
        gate = QueueGate("q", breaker, lambda mode: None, "w", rand=lambda d=draw: d)
        gate.mode = PAUSE
        gate.wanted = lambda: CONSUME  # type: ignore[method-assign]
        gate._stopped = SimpleNamespace(wait=lambda seconds: waits.append(seconds) or False)  # type: ignore[assignment]
        gate.reconcile()
        assert gate.mode == CONSUME
    assert waits == [0.25 * RESUME_JITTER_SECONDS, 0.75 * RESUME_JITTER_SECONDS]
