"""The parking lot's release pace on a real Redis: probe window, slow start, sleeping releasers."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbtasks import BreakerPolicy, CircuitBreaker, CircuitBreakerTask, Outcome, RedisStore, State
from cbtasks.stores._parking import ParkingLot
from cbtasks.task import _releaser
from cbtasks.task._parked import publish_parked
from cbtasks.task._releaser import Releaser
from tests.conftest import FakeClock, wait_for

POLICY = BreakerPolicy(failure_threshold=1, open_seconds=10)


@pytest.fixture
def parts(redis_url: str, name: str, clock: FakeClock) -> Iterator[dict[str, Any]]:
    store = RedisStore(redis_url, clock=clock)
    yield {
        "store": store,
        "breaker": CircuitBreaker(name, policy=POLICY, store=store),
        "lot": ParkingLot(store.client, "cbtasks", name),
        "clock": clock,
    }
    store.close()


def park(lot: ParkingLot, count: int, clock: FakeClock) -> None:
    for i in range(count):
        lot.park(f"req-{i}", {"task": "t", "i": i}, now=clock.now)


def released(lot: ParkingLot, clock: FakeClock, **kwargs: Any) -> list[int]:
    batch = lot.release(20.0, now=clock.now, most=10_000, **kwargs)
    lot.ack([request_id for request_id, _ in batch.requests])
    return [message["i"] for _, message in batch.requests]


def trip(breaker: CircuitBreaker) -> None:
    breaker.record(breaker.admit(), Outcome.FAILURE)
    assert breaker.state is State.OPEN


def test_nothing_leaves_while_open_before_the_probe_window(parts: dict[str, Any]) -> None:
    """Open: no release until the open period ends, and the wait says when that is."""
    lot, clock, breaker = parts["lot"], parts["clock"], parts["breaker"]
    trip(breaker)
    park(lot, 5, clock)
    clock.advance(9.9)
    batch = lot.release(20.0, now=clock.now)
    assert batch.requests == []
    assert batch.wait == pytest.approx(0.1, abs=0.002)
    assert lot.count() == 5


def test_one_request_per_probe_interval_while_it_may_probe(parts: dict[str, Any]) -> None:
    """After the open period the oldest request goes alone, to probe; the next a second later."""
    lot, clock, breaker = parts["lot"], parts["clock"], parts["breaker"]
    trip(breaker)
    park(lot, 5, clock)
    clock.advance(10)
    assert released(lot, clock) == [0]
    assert released(lot, clock) == []
    clock.advance(1)
    assert released(lot, clock) == [1]


def test_slow_start_doubles_every_second_once_closed(parts: dict[str, Any]) -> None:
    """Closed: 20 at once, then the rate doubles each second (20 -> 40 -> 80 a second)."""
    lot, clock = parts["lot"], parts["clock"]
    parts["breaker"].call(lambda: None)  # the breaker exists, closed
    park(lot, 500, clock)
    counts = [len(released(lot, clock))]
    for _ in range(3):
        clock.advance(1)
        counts.append(len(released(lot, clock)))
    # The tokens of a second are the mean of its rates: (20+40)/2, (40+80)/2, (80+160)/2.
    assert counts == [20, 30, 60, 120]


def test_a_failure_halves_the_rate_and_a_trip_stops_it(parts: dict[str, Any]) -> None:
    """A failure during the ramp halves it; a trip releases nothing; a new close starts over."""
    lot, clock, breaker = parts["lot"], parts["clock"], parts["breaker"]
    relaxed = CircuitBreaker(
        breaker.name,
        policy=BreakerPolicy(failure_threshold=3, open_seconds=10),
        store=breaker.store,
    )
    relaxed.call(lambda: None)
    park(lot, 1000, clock)
    released(lot, clock)
    clock.advance(2)
    # 20 -> 80 over two seconds: 100 accrued, at most one second's worth (80) banked.
    assert len(released(lot, clock)) == 80
    relaxed.record(relaxed.admit(), Outcome.FAILURE)  # rate 80 -> 40
    clock.advance(1)
    # 120 accrued at 80 -> 160, then the rate halved to 80: one second's worth, 80.
    assert len(released(lot, clock)) == 80
    clock.advance(1)
    assert len(released(lot, clock)) == 120  # 80 -> 160
    relaxed.record(relaxed.admit(), Outcome.FAILURE)
    relaxed.record(relaxed.admit(), Outcome.FAILURE)
    assert relaxed.state is State.OPEN
    clock.advance(5)
    assert released(lot, clock) == []
    relaxed.force_close()
    assert len(released(lot, clock)) == 20  # a new closed period: from the base rate


def test_releasing_nothing_writes_nothing(parts: dict[str, Any], redis_url: str) -> None:
    """An empty lot, or a closed one waiting for tokens, costs no write at all."""
    lot, clock = parts["lot"], parts["clock"]
    parts["breaker"].call(lambda: None)
    client = redis.Redis.from_url(redis_url)
    client.config_resetstat()
    for _ in range(10):
        assert lot.release(20.0, now=clock.now).wait is None
    park(lot, 30, clock)
    released(lot, clock)  # 20 go; 10 wait for tokens
    client.config_resetstat()
    for _ in range(10):
        batch = lot.release(20.0, now=clock.now)
        assert batch.requests == [] and batch.wait == pytest.approx(0.05, abs=0.002)
    stats = client.info("commandstats")
    writes = {"cmdstat_hset", "cmdstat_zadd", "cmdstat_zrem", "cmdstat_zpopmin", "cmdstat_publish"}
    assert writes & set(stats) == set()


def test_a_sleeping_releaser_wakes_on_news(redis_url: str, name: str) -> None:
    """Parked while open; an operator's close is news, and the releaser publishes at once."""
    store = RedisStore(redis_url)
    breaker = CircuitBreaker(name, policy=POLICY, store=store)
    lot = ParkingLot(store.client, "cbtasks", name)
    published: list[str] = []
    try:
        trip(breaker)
        releaser = Releaser(lot, lambda request_id, _, **__: published.append(request_id), rate=20)
        store.add_news_hook(releaser.hear)
        threading.Thread(target=releaser.run, daemon=True).start()
        lot.park("a", {"task": "t"})
        breaker.force_close()
        # Far sooner than the 10 s open period or the 6 s re-check: news woke it.
        wait_for(lambda: published == ["a"], 3, "the release after the close")
    finally:
        store.close()


def test_a_lost_news_message_is_caught_by_the_recheck(
    redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A releaser that hears no news at all still releases, at its next re-check."""
    monkeypatch.setattr(_releaser, "RECHECK_SECONDS", 0.5)
    store = RedisStore(redis_url)
    breaker = CircuitBreaker(name, policy=POLICY, store=store)
    lot = ParkingLot(store.client, "cbtasks", name)
    published: list[str] = []
    try:
        breaker.force_open()
        releaser = Releaser(lot, lambda request_id, _, **__: published.append(request_id), rate=20)
        threading.Thread(target=releaser.run, daemon=True).start()  # deaf: no news hook
        lot.park("a", {"task": "t"})
        wait_for(lambda: releaser.wake.is_set() is False, 2, "the releaser to sleep")
        breaker.force_close()
        wait_for(lambda: published == ["a"], 3, "the re-check to release it")
    finally:
        store.close()


def test_an_expired_request_leaves_the_lot_while_open(parts: dict[str, Any]) -> None:
    """Its `expires` passed: handed out as expired even while the circuit is open."""
    lot, clock, breaker = parts["lot"], parts["clock"], parts["breaker"]
    trip(breaker)
    lot.park("soon", {"task": "t", "i": 0}, now=clock.now, expires_at=clock.now + 2)
    lot.park("later", {"task": "t", "i": 1}, now=clock.now, expires_at=clock.now + 60)
    lot.park("never", {"task": "t", "i": 2}, now=clock.now)
    first = lot.release(20.0, now=clock.now)
    assert first.expired == [] and first.requests == []
    assert first.wait == pytest.approx(2.0, abs=0.002)  # woken when the first one expires
    clock.advance(2)
    batch = lot.release(20.0, now=clock.now)
    assert [request_id for request_id, _ in batch.expired] == ["soon"]
    assert batch.requests == []
    assert lot.count() == 2


def test_a_releaser_revokes_what_expired(redis_url: str, name: str) -> None:
    """The releaser hands expired requests to its expire callback, not to publish."""
    store = RedisStore(redis_url)
    breaker = CircuitBreaker(name, policy=POLICY, store=store)
    lot = ParkingLot(store.client, "cbtasks", name)
    published: list[str] = []
    expired: list[str] = []
    try:
        breaker.force_open()
        releaser = Releaser(
            lot,
            lambda request_id, _, **__: published.append(request_id),
            expire=lambda request_id, _: expired.append(request_id),
            rate=20,
        )
        lot.park("a", {"task": "t"}, expires_at=time.time() + 0.3)
        threading.Thread(target=releaser.run, daemon=True).start()
        wait_for(lambda: expired == ["a"], 3, "the expired request")
        assert published == [] and lot.count() == 0
    finally:
        store.close()


def _poison_app(redis_url: str, breaker: str) -> tuple[Celery, list[dict[str, Any]]]:
    """An app whose tasks record what would be published instead of sending it."""
    app = Celery("poison", broker=redis_url, set_as_current=False)
    app.conf.cbtasks_redis_url = redis_url
    sent: list[dict[str, Any]] = []

    @app.task(base=CircuitBreakerTask, shared=False, breaker=breaker, defer="park", name="mine")
    def mine(x: int) -> int:
        """Parks with this breaker."""
        return x

    @app.task(base=CircuitBreakerTask, shared=False, breaker="elsewhere", name="other")
    def other(x: int) -> int:
        """Parks with another breaker."""
        return x

    @app.task(shared=False, name="plain")
    def plain(x: int) -> int:
        """Not a CircuitBreakerTask at all."""
        return x

    app.finalize(auto=True)
    for task in (app.tasks["mine"], app.tasks["other"], app.tasks["plain"]):
        task.apply_async = lambda *a, _n=task.name, **kw: sent.append({"task": _n, **kw})  # type: ignore[method-assign]
    return app, sent


def test_poison_goes_to_the_dead_letters_and_blocks_nothing(redis_url: str, name: str) -> None:
    """A list, an unknown task, another breaker's task, a plain task, a forged task id: each is
    put aside once, with its reason; the good requests around them are published."""
    app, sent = _poison_app(redis_url, name)
    store = RedisStore(redis_url)
    lot = ParkingLot(store.client, "cbtasks", name)
    good = {"task": "mine", "args": [1], "kwargs": {}, "retries": 0, "headers": {}}
    good = {**good, "queue": None, "options": {"serializer": "pickle", "exchange": "x"}}
    poison = {
        "unknown": {**good, "task": "nope"},
        "other": {**good, "task": "other"},
        "plain": {**good, "task": "plain"},
        "forged": {**good, "options": {"task_id": "someone-else"}},
        "shape": {**good, "args": "not a list"},
    }
    lot.park("good-1", good)
    for request_id, message in poison.items():
        lot.park(request_id, message)
    lot.client.hset(f"cbtasks:{{{name}}}:parked:data", "a-list", "[1, 2, 3]")
    lot.client.zadd(f"cbtasks:{{{name}}}:parked", {"a-list": 1})
    lot.park("good-2", good)
    releaser = Releaser(lot, functools.partial(publish_parked, app, name), rate=100)
    try:
        assert releaser.step() == 0.0
        assert releaser.step() in (None, 0.0)
        assert sorted(m["task_id"] for m in sent) == ["good-1", "good-2"]
        assert all("serializer" not in m and "exchange" not in m for m in sent)
        dead = lot.dead_letters()
        assert set(dead) == {*poison, "a-list"}
        assert "not a CircuitBreakerTask" in dead["unknown"]["reason"]
        assert "does not park with breaker" in dead["other"]["reason"]
        assert lot.count() == 0 and lot.dead_count() == 6
    finally:
        store.close()


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=200))
def test_any_bytes_parked_are_released_or_put_aside(redis_url: str, data: bytes) -> None:
    """Whatever bytes sit in the lot: no exception out of the releaser, nothing left behind."""
    app, _ = _poison_app(redis_url, "fuzzed")
    store = RedisStore(redis_url)
    lot = ParkingLot(store.client, "cbtasks", "fuzzed")
    lot.client.hset("cbtasks:{fuzzed}:parked:data", "r", data)
    lot.client.zadd("cbtasks:{fuzzed}:parked", {"r": 1})
    releaser = Releaser(lot, functools.partial(publish_parked, app, "fuzzed"), rate=100)
    try:
        releaser.step()
        assert lot.count() == 0
        assert lot.dead_count() == 1
    finally:
        lot.client.delete("cbtasks:{fuzzed}:parked:dead")
        store.close()


def test_a_worker_shutting_down_stops_its_releasers(redis_url: str, name: str) -> None:
    """worker_shutting_down (a warm shutdown) stops the releaser: it publishes nothing more to
    a worker that is going away, and what it did not publish stays parked."""
    from celery import signals

    store = RedisStore(redis_url)
    breaker = CircuitBreaker(name, policy=POLICY, store=store)
    lot = ParkingLot(store.client, "cbtasks", name)
    published: list[str] = []
    try:
        breaker.force_open()
        releaser = Releaser.ensure(
            f"shutdown-{name}",
            lambda: Releaser(
                lot, lambda request_id, _, **__: published.append(request_id), rate=1000
            ),
            store.add_news_hook,
        )
        lot.park("before", {"task": "t"})
        signals.worker_shutting_down.send(sender="w1@test", sig="SIGTERM", how="Warm", exitcode=0)
        assert releaser.stopped
        assert releaser._thread is not None and not releaser._thread.is_alive()
        # Its thread has ended: a close (news that would wake it) finds no one to publish.
        breaker.force_close()
        assert published == [] and lot.count() == 1
    finally:
        store.close()
