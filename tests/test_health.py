"""Health checks: they end an open period early, never close a circuit, and one process checks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cbtasks import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    EndpointFailure,
    MemoryStore,
    RedisStore,
    State,
    StateChange,
    Store,
)
from cbtasks._health import HealthChecker
from cbtasks._testing.processes import ModelServer
from cbtasks.clients import http_client
from tests.conftest import STORES, FakeClock, open_store, wait_for

POLICY = BreakerPolicy(failure_threshold=1, open_seconds=300)


@pytest.fixture(autouse=True)
def stop_checkers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every health checker a test starts is stopped after it."""
    started: list[HealthChecker] = []
    start = HealthChecker.ensure_running

    def ensure_running(self: HealthChecker) -> None:
        started.append(self)
        start(self)

    monkeypatch.setattr(HealthChecker, "ensure_running", ensure_running)
    yield
    for checker in started:
        checker.stop()


def down() -> None:
    raise EndpointFailure("503")


def trip(breaker: CircuitBreaker) -> None:
    with pytest.raises(EndpointFailure):
        breaker.call(down)
    assert breaker.state is State.OPEN


@pytest.fixture(params=[kind for kind in STORES if kind != "async-redis"])
def store(request: pytest.FixtureRequest, clock: FakeClock) -> Iterator[Store]:
    """The blocking stores: health checks run in a thread (an AsyncRedisStore refuses them)."""
    yield from open_store(request.param, request, clock)


def test_a_passing_check_makes_an_open_circuit_half_open(name: str, store: Store) -> None:
    """Long before the open period ends, a passing check lets a probe through; it closes."""
    events: list[StateChange] = []
    breaker = CircuitBreaker(
        name,
        policy=POLICY,
        store=store,
        listeners=[events.append],
        health_check=lambda: True,
        health_interval=0.05,
    )
    trip(breaker)
    wait_for(lambda: breaker.state is State.HALF_OPEN, 5, "the check to half-open it")
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.state is State.CLOSED
    reasons = [(e.to_state, e.reason) for e in events]
    assert (State.HALF_OPEN, "health check passed") in reasons


def test_a_failing_or_raising_check_keeps_it_open(name: str, store: Store) -> None:
    """False, or an exception, changes nothing: the circuit stays open."""
    answers: Iterator[bool | Exception] = iter([False, RuntimeError("no route"), False])

    def check() -> bool:
        answer = next(answers, False)
        if isinstance(answer, Exception):
            raise answer
        return answer

    breaker = CircuitBreaker(
        name, policy=POLICY, store=store, health_check=check, health_interval=0.05
    )
    trip(breaker)
    health = breaker.health
    assert health is not None
    clock = store.local_clock
    if isinstance(clock, FakeClock):  # claims run out on the store's clock
        wait_for(lambda: health.checks >= 1, 5, "a check")
        clock.advance(0.1)
    wait_for(lambda: health.checks >= 2, 5, "two checks")
    assert health.passed == 0
    assert breaker.state is State.OPEN


def test_a_hung_check_times_out_and_says_so(name: str) -> None:
    """A check that never returns blocks nothing: after health_timeout it counts as failed,
    HealthChecked.error a TimeoutError saying so; no second check starts while it hangs."""
    import threading

    from cbtasks import HealthChecked

    hang = threading.Event()
    started: list[int] = []

    def check() -> bool:
        started.append(1)
        hang.wait(10)
        return True

    seen: list[HealthChecked] = []
    breaker = CircuitBreaker(
        name,
        policy=POLICY,
        store=MemoryStore(),
        health_check=check,
        health_interval=0.05,
        health_timeout=0.1,
    )
    breaker.events.subscribe(lambda e: seen.append(e) if isinstance(e, HealthChecked) else None)
    try:
        trip(breaker)
        wait_for(lambda: len(seen) >= 3, 5, "three checks' results")
        assert all(not e.healthy and isinstance(e.error, TimeoutError) for e in seen)
        assert "timed out after 0.1 s" in str(seen[0].error)
        assert "has not returned" in str(seen[1].error)
        assert len(started) == 1  # the hung one is waited out, not piled on
        assert breaker.state is State.OPEN
    finally:
        hang.set()


def test_a_health_check_leaves_a_forced_open_alone(name: str, store: Store) -> None:
    """An operator's forced open is not the health check's to end."""
    breaker = CircuitBreaker(name, policy=POLICY, store=store)
    breaker.force_open()
    breaker.health_passed()
    assert breaker.state is State.OPEN
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: None)


def test_one_process_of_the_fleet_has_each_turn(name: str, store: Store, clock: FakeClock) -> None:
    """A turn goes to one caller until it runs out."""
    assert store.claim(name, "health", 1000) is True
    assert store.claim(name, "health", 1000) is False
    clock.advance(1.0)
    if not isinstance(store, MemoryStore):  # Redis times keys out on its own clock
        wait_for(lambda: store.claim(name, "health", 1000), 3, "the turn to run out")
    else:
        assert store.claim(name, "health", 1000) is True


def test_bad_health_options_are_refused(name: str) -> None:
    """A health check that cannot work fails when the breaker is made."""
    from cbtasks import PolicyError

    with pytest.raises(PolicyError, match="callable"):
        CircuitBreaker(name, health_check="http://model/healthz")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="health_interval"):
        CircuitBreaker(name, health_check=lambda: True, health_interval=0)


@pytest.fixture(scope="module")
def model() -> Iterator[ModelServer]:
    with ModelServer() as server:
        yield server


def test_a_lying_health_endpoint_never_closes_the_circuit(
    model: ModelServer, redis_url: str, name: str
) -> None:
    """/healthz answers 200 while every prediction fails: half-open, probe fails, open again."""
    model.faults(error_rate=1.0)
    client = http_client(model.url)
    store = RedisStore(redis_url)
    events: list[StateChange] = []
    breaker = CircuitBreaker(
        name,
        policy=BreakerPolicy(failure_threshold=1, open_seconds=300, half_open_probes=1),
        store=store,
        listeners=[events.append],
        health_check=client.healthy,
        health_interval=0.05,
    )

    def predict() -> object:
        return client.predict({"features": [5.1, 3.5, 1.4, 0.2]})

    try:
        assert client.healthy()
        with pytest.raises(EndpointFailure):
            breaker.call(predict)
        for _ in range(3):
            wait_for(lambda: breaker.state is State.HALF_OPEN, 5, "the health check")
            with pytest.raises(EndpointFailure):
                breaker.call(predict)  # the probe: a real prediction, and it fails
            assert breaker.state is State.OPEN
        assert State.CLOSED not in [e.to_state for e in events]
        assert breaker.health is not None and breaker.health.passed >= 3
    finally:
        if breaker.health is not None:
            breaker.health.stop()
        model.clear_faults()
        store.close()


def test_healthz_is_down_during_an_injected_outage(model: ModelServer) -> None:
    """The reference server's health endpoint fails during an outage, as a dead server's would."""
    client = http_client(model.url)
    model.faults(outage_seconds=30)
    try:
        assert client.healthy() is False
    finally:
        model.clear_faults()
    assert client.healthy() is True


def test_the_fleet_makes_one_check_per_interval_however_many_know_it_open(
    redis_url: str, name: str
) -> None:
    """Three processes that each heard "open" from the store: only the one holding the
    fleet's turn calls the endpoint in an interval (a checker skipping the turn made three)."""
    from cbtasks import RedisStore
    from cbtasks._machine import OPEN
    from cbtasks._state import Mode

    calls: list[int] = []
    stores = [RedisStore(redis_url) for _ in range(3)]
    try:
        checkers = [
            HealthChecker(name, store, lambda: calls.append(1), 30.0, lambda: None)
            for store in stores
        ]
        for checker in checkers:
            checker.observe(OPEN, 60_000, Mode.NORMAL, checker.store.local_clock())
            checker._once()
        assert len(calls) == 1
        assert sum(checker.checks for checker in checkers) == 1
    finally:
        for store in stores:
            store.close()


# -- why a check failed: the shipped clients' health() -----------------------------------


def test_the_http_client_says_why_it_is_not_ready(model: ModelServer) -> None:
    """health() tells a refused connection from no answer in time from "answered: not
    ready", and healthy() agrees with it; the metric's label follows the reason."""
    import socket

    from cbtasks._testing.redis_server import free_port
    from cbtasks.ops.metrics import health_result

    refused = http_client(f"http://127.0.0.1:{free_port()}").health(timeout=1)
    assert not refused and isinstance(refused.error, ConnectionError)
    assert health_result(False, refused.error) == "unreachable"

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        late = http_client(url).health(timeout=0.2)
    assert not late and isinstance(late.error, TimeoutError)
    assert "no answer within 0.2 s" in late.why
    assert health_result(False, late.error) == "timeout"

    client = http_client(model.url)
    model.faults(outage_seconds=30)
    try:
        down = client.health()
        assert not down and isinstance(down.error, EndpointFailure)
        assert down.error.status == 503 and "/healthz answered 503" in down.why
        assert health_result(False, down.error) == "unhealthy"
        assert client.healthy() is False
    finally:
        model.clear_faults()
    up = client.health()
    assert up and up.error is None and up.why == "ready" and client.healthy() is True


def test_the_grpc_client_says_why_it_is_not_ready() -> None:
    """NOT_SERVING is named; a target nobody listens on is unreachable."""
    from grpc_health.v1 import health_pb2

    from cbtasks._testing.redis_server import free_port
    from cbtasks.clients import grpc_client
    from tests.product_servers import GrpcProductServer

    with GrpcProductServer() as server:
        client = grpc_client(server.target)
        server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        answer = client.health()
        assert not answer and isinstance(answer.error, EndpointFailure)
        assert answer.error.status == "NOT_SERVING"
        server.health.set("", health_pb2.HealthCheckResponse.SERVING)
        assert client.health()
    nobody = grpc_client(f"127.0.0.1:{free_port()}").health(timeout=1)
    assert not nobody and isinstance(nobody.error, ConnectionError | TimeoutError)


def test_the_checker_hands_on_the_clients_reason(name: str) -> None:
    """health_check=client.health: HealthChecked.error is the client's reason, and the
    Prometheus counter labels the check "unreachable" (it said only "unhealthy")."""
    from prometheus_client import REGISTRY

    from cbtasks import HealthChecked
    from cbtasks._testing.redis_server import free_port
    from cbtasks.ops.metrics import metrics

    client = http_client(f"http://127.0.0.1:{free_port()}")
    seen: list[HealthChecked] = []
    breaker = CircuitBreaker(
        name, policy=POLICY, store=MemoryStore(), health_check=client.health, health_interval=0.05
    )
    breaker.events.subscribe(lambda e: seen.append(e) if isinstance(e, HealthChecked) else None)
    breaker.events.subscribe(metrics().observe)
    trip(breaker)
    wait_for(lambda: len(seen) >= 2, 5, "two checks' results")
    assert all(not e.healthy and isinstance(e.error, ConnectionError) for e in seen)
    labels = {"breaker": name, "result": "unreachable"}
    counted = REGISTRY.get_sample_value("cbtasks_health_checks_total", labels)
    assert counted is not None and counted >= 2
    assert breaker.state is State.OPEN
