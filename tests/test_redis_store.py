"""RedisStore specifics: news between processes, keys, clocks, and Redis outages."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Iterator

import pytest
import redis

from cbtasks import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    OnError,
    PolicyError,
    RedisStore,
    State,
    StoreUnavailableError,
)
from cbtasks._testing.redis_server import RedisServer, free_port
from tests.conftest import wait_for


def boom() -> None:
    raise ConnectionResetError("endpoint down")


def test_a_trip_elsewhere_is_heard_within_100_ms(redis_url: str) -> None:
    """Another process's trip reaches this process's local view by news (median of 5)."""
    here = CircuitBreaker("news", fail_max=1, store=RedisStore(redis_url))
    there = CircuitBreaker("news", fail_max=1, store=RedisStore(redis_url))
    here.call(lambda: None)
    time.sleep(0.2)  # let the listener subscribe before the first news is sent
    delays = []
    for _ in range(5):
        here.call(lambda: None)  # learns "closed": its next calls skip Redis
        assert here._view.closed
        with pytest.raises(ConnectionResetError):
            there.call(boom)
        tripped = time.monotonic()
        wait_for(lambda: not here._view.closed, 5.0, "news of the trip")
        delays.append(time.monotonic() - tripped)
        with pytest.raises(CircuitOpenError):
            here.call(lambda: None)
        there.reset()
        wait_for(
            lambda: here._view.closed or here._view.reject_until == 0, 5.0, "news of the reset"
        )
    assert statistics.median(delays) < 0.1, delays


def test_keys_are_hash_tagged_per_breaker(redis_url: str) -> None:
    """Every key of one breaker shares the {name} hash tag (Redis Cluster slots)."""
    breaker = CircuitBreaker(
        "tagged",
        policy=BreakerPolicy(failure_threshold=1, open_seconds=0.01),
        store=RedisStore(redis_url, prefix="cb"),
    )
    with pytest.raises(ConnectionResetError):
        breaker.call(boom)
    wait_for(lambda: breaker.state is State.HALF_OPEN, 5)
    breaker.admit()  # takes a probe: the probe key exists now
    keys = {k.decode() for k in redis.Redis.from_url(redis_url).keys("*")}
    assert keys and all(k.startswith("cb:{tagged}:") for k in keys), keys


def test_time_is_redis_time_not_the_hosts(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose clock is an hour off still agrees on when the circuit reopens."""
    breaker = CircuitBreaker("skew", fail_max=1, reset_timeout=30, store=RedisStore(redis_url))
    with pytest.raises(ConnectionResetError):
        breaker.call(boom)
    monkeypatch.setattr(time, "time", lambda: 1e9 + 3600)
    other = CircuitBreaker("skew", fail_max=1, reset_timeout=30, store=RedisStore(redis_url))
    with pytest.raises(CircuitOpenError) as info:
        other.call(lambda: None)
    assert 29 < info.value.retry_after <= 30
    status = other.status()
    assert status is not None and status.open_until is not None


def test_names_lists_breakers(redis_url: str) -> None:
    """names() finds every breaker under the prefix."""
    store = RedisStore(redis_url)
    for name in ("a", "b/c", "model:v2"):
        CircuitBreaker(name, store=store).call(lambda: None)
    assert store.names() == ["a", "b/c", "model:v2"]


def test_password_and_url_pass_through() -> None:
    """Auth in the URL reaches Redis; the password never appears in repr or errors."""
    with RedisServer(password="s3cret-pw") as server:
        store = RedisStore(server.url)
        CircuitBreaker("auth", store=store).call(lambda: None)
        assert "s3cret" not in repr(store)
        bad = RedisStore(server.url.replace("s3cret-pw", "wrong"))
        with pytest.raises(Exception) as info:
            bad.ping()
        assert "s3cret" not in str(info.value) and "wrong" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["http://localhost:6379", "redis://localhost:notaport/0", "localhost:6379", ""]
)
def test_malformed_url_is_a_clear_error(url: str) -> None:
    """A URL redis cannot parse names the accepted forms."""
    with pytest.raises(PolicyError, match="redis://"):
        RedisStore(url).ping()


def test_unreachable_redis_is_a_clear_error() -> None:
    """ping() says where it tried and what to check, quickly."""
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="cannot reach Redis at redis://127.0.0.1"):
        store.ping()
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("bad", [{"on_error": "ignore"}, {"prefix": ""}, {"timeout": 0}])
def test_bad_store_options(bad: dict[str, object]) -> None:
    """Invalid options fail at construction with the field's name."""
    with pytest.raises(PolicyError, match=next(iter(bad))):
        RedisStore("redis://localhost", **bad)  # type: ignore[arg-type]


@pytest.fixture
def doomed_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, to stop and start again."""
    with RedisServer() as server:
        yield server


@pytest.mark.parametrize("on_error", list(OnError))
def test_redis_outage_follows_on_error_and_recovers(
    doomed_redis: RedisServer, on_error: OnError, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stops mid-run: calls go on as on_error says, never stall, recover by themselves."""
    store = RedisStore(doomed_redis.url, on_error=on_error, retry_interval=0.2)
    breaker = CircuitBreaker("outage", fail_max=3, reset_timeout=60, store=store)
    assert breaker.call(lambda: "up") == "up"
    caplog.set_level(logging.WARNING, logger="cbtasks")
    doomed_redis.stop()
    # The call that finds Redis gone may still be admitted from the cache.
    with contextlib.suppress(CircuitOpenError):
        breaker.call(lambda: "first")

    outcomes = []
    started = time.monotonic()
    for _ in range(40):
        try:
            outcomes.append(breaker.call(lambda: "served"))
        except CircuitOpenError:
            outcomes.append("rejected")
    assert time.monotonic() - started < 3, "calls stalled while Redis was down"
    expected = "rejected" if on_error is OnError.REJECT else "served"
    assert set(outcomes) == {expected}
    if on_error is OnError.LOCAL:
        # The local breaker still trips on local failures.
        for _ in range(3):
            with pytest.raises(ConnectionResetError):
                breaker.call(boom)
        with pytest.raises(CircuitOpenError):
            breaker.call(lambda: None)
    assert store.error_count >= 1 and not store.available
    outage_logs = [r for r in caplog.records if "cannot reach Redis" in r.getMessage()]
    assert len(outage_logs) == 1

    doomed_redis.start()
    wait_for(lambda: _served(breaker), 10, "the store to reconnect")
    assert store.available
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    status = breaker.status()
    assert status is not None and status.state is State.CLOSED
    store.close()


def _served(breaker: CircuitBreaker) -> bool:
    try:
        breaker.call(lambda: None)
    except CircuitOpenError:
        return False
    return breaker.store.available  # type: ignore[attr-defined, no-any-return]


def test_an_operators_read_starts_no_news_subscription(redis_url: str, name: str) -> None:
    """`cbtasks status` and the metrics read every breaker: no views, no news thread for it."""
    from cbtasks.ops.cli import status_rows

    writer = RedisStore(redis_url)
    CircuitBreaker(name, store=writer).call(lambda: None)
    reader = RedisStore(redis_url)
    assert any(row["name"] == name for row in status_rows(reader))
    assert reader.news._listener is None
    writer.close()
    reader.close()


def test_threads_of_a_fresh_process_start_one_news_listener(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """view() checked for a listener outside its lock: eight threads asking at once (as a
    fresh prefork child's do) could each start one."""
    import threading

    from cbtasks.stores import _news

    started: list[object] = []
    real = _news.NewsListener

    class SlowToStart(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            time.sleep(0.05)  # widen the window between the check and the assignment
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    monkeypatch.setattr(_news, "NewsListener", SlowToStart)
    store = RedisStore(redis_url)
    gate = threading.Barrier(8)

    def ask(i: int) -> None:
        gate.wait()
        store.view(f"model-{i}")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    store.close()
    assert len(started) == 1


def test_an_older_reply_never_overwrites_a_newer_one() -> None:
    """Replies race (a slow record's answer arrives after a newer admit's): the view keeps
    the newest version; one that ignored the order would cache "closed" during an outage."""
    from cbtasks._machine import CLOSED, OPEN
    from cbtasks._state import Mode
    from cbtasks.stores._base import LocalView

    view = LocalView()
    view.apply(OPEN, 60_000, Mode.NORMAL, 7, now=100.0)
    view.apply(CLOSED, 0, Mode.NORMAL, 6, now=100.1)  # older: ignored
    assert not view.closed and view.reject_until == pytest.approx(160.0)
    view.apply(CLOSED, 0, Mode.NORMAL, 7, now=100.2)  # the same version again: ignored
    assert not view.closed
    view.apply(CLOSED, 0, Mode.NORMAL, 8, now=100.3)
    assert view.closed and view.reject_until == 0.0


def test_scripts_survive_a_script_flush(redis_url: str, name: str) -> None:
    """Run by their SHA; after SCRIPT FLUSH (or a restart) Redis says NOSCRIPT and the
    script is loaded again, for the breaker's scripts and the parking lot's alike."""
    from cbtasks.stores._parking import ParkingLot

    store = RedisStore(redis_url)
    breaker = CircuitBreaker(name, store=store, fail_max=1)
    lot = ParkingLot(store.client, store.prefix, name)
    try:
        breaker.call(lambda: None)
        store.client.script_flush()
        with pytest.raises(ConnectionResetError):
            breaker.call(boom)
        assert breaker.state is State.OPEN
        store.client.script_flush()
        assert lot.park("r1", {"task": "x"}) >= 1
        assert lot.count() == 1
    finally:
        store.close()
