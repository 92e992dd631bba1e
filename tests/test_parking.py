"""The parking lot's release pace on a real Redis: probe window, slow start, sleeping releasers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from cbtasks import BreakerPolicy, CircuitBreaker, Outcome, RedisStore, State
from cbtasks.stores._parking import ParkingLot
from cbtasks.task import _releaser
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
        releaser = Releaser(lot, lambda request_id, _: published.append(request_id), rate=20)
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
        releaser = Releaser(lot, lambda request_id, _: published.append(request_id), rate=20)
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
            lambda request_id, _: published.append(request_id),
            expire=lambda request_id, _: expired.append(request_id),
            rate=20,
        )
        lot.park("a", {"task": "t"}, expires_at=time.time() + 0.3)
        threading.Thread(target=releaser.run, daemon=True).start()
        wait_for(lambda: expired == ["a"], 3, "the expired request")
        assert published == [] and lot.count() == 0
    finally:
        store.close()
