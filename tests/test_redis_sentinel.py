"""A real Sentinel set (master, replica, three sentinels): shared breakers through failovers."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbtasks import BreakerPolicy, CircuitBreaker, CircuitOpenError, RedisStore, State
from cbtasks._testing.redis_sentinel import RedisSentinelSet
from tests.conftest import wait_for
from tests.state_elsewhere import tasks_complete_once_through, worker_with_state_on

POLICY = BreakerPolicy(failure_threshold=2, open_seconds=30)


@pytest.fixture
def sentinels() -> Iterator[RedisSentinelSet]:
    with RedisSentinelSet() as servers:
        yield servers


def _trip(breaker: CircuitBreaker) -> None:
    for _ in range(POLICY.failure_threshold):
        with pytest.raises(ZeroDivisionError):
            breaker.call(lambda: 1 / 0)


def _rejects(breaker: CircuitBreaker) -> bool:
    try:
        breaker.call(lambda: None)
    except CircuitOpenError:
        return True
    return False


def _failed_over(sentinels: RedisSentinelSet, old_port: int) -> bool:
    try:
        return sentinels.master_port() != old_port
    except Exception:
        return False


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_processes_share_a_breaker_through_a_failover(
    sentinels: RedisSentinelSet, how: str
) -> None:
    """Trip, close and trip again across two processes' stores, the master lost in between
    (SIGKILL, or SIGSTOP: a master that holds its sockets and says nothing)."""
    one, other = RedisStore(sentinels.url), RedisStore(sentinels.url)
    here = CircuitBreaker("failover-model", policy=POLICY, store=one)
    there = CircuitBreaker("failover-model", policy=POLICY, store=other)
    old_port = sentinels.master.port
    try:
        there.call(lambda: None)
        _trip(here)
        wait_for(lambda: _rejects(there), 10, "news of the trip")
        here.force_close()
        wait_for(lambda: there.state is State.CLOSED, 10, "the close")
        if how == "killed":
            sentinels.master.process.kill()
        else:
            sentinels.master.freeze()
        worst = 0.0
        deadline = time.monotonic() + 30
        while not _failed_over(sentinels, old_port):
            assert time.monotonic() < deadline, "the sentinels did not fail over"
            for breaker in (here, there):
                start = time.perf_counter()
                assert breaker.call(lambda: "answered") == "answered"  # on_error="local"
                worst = max(worst, time.perf_counter() - start)
            time.sleep(0.05)
        assert worst < 1.0, f"a guarded call took {worst:.2f}s during the failover"
        # On the new master: a trip in one process reaches the other, whose
        # subscription was remade by itself (the old one went silent or broke).
        listener = other.news._listener
        assert listener is not None
        wait_for(lambda: listener.subscriptions >= 2, 20, "the news subscription made again")
        wait_for(
            lambda: _calls_reach_redis(here) and _calls_reach_redis(there), 20, "the new master"
        )
        there.call(lambda: None)  # its view: closed, from the new master
        _trip(here)
        wait_for(lambda: _rejects(there), 5, "news after the failover")
    finally:
        if how == "frozen":
            sentinels.master.thaw()
        one.close()
        other.close()


def _calls_reach_redis(breaker: CircuitBreaker) -> bool:
    """A call answered from the shared state again (not by on_error)."""
    with contextlib.suppress(CircuitOpenError):
        breaker.call(lambda: None)
    return breaker.store.available  # type: ignore[no-any-return]


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_tasks_through_a_failover_complete_once(
    sentinels: RedisSentinelSet, tmp_path: Path, how: str
) -> None:
    """A worker whose breaker state is behind Sentinel; the master SIGKILLed or SIGSTOPped
    mid-traffic: every task completes, none calls the endpoint twice after a success."""
    with worker_with_state_on(sentinels.url, tmp_path) as (app, model):
        master = sentinels.master
        try:
            tasks_complete_once_through(
                app, model, master.kill if how == "killed" else master.freeze
            )
        finally:
            if how == "frozen":
                master.thaw()


# -- URL forms, and what an operator reads when the master is gone ----------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis://127.0.0.1:26379/0?sentinel=mymaster", "redis+sentinel://host:port/master_name"),
        ("redis://127.0.0.1:6379/0?bogus_option=1", "bogus_option"),
        ("memcached://127.0.0.1:11211", "unknown scheme 'memcached'"),
        ("sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380", "master_name"),
        ("sentinel://127.0.0.1:26379;redis://127.0.0.1:26380?master_name=m", "is not sentinel://"),
    ],
)
def test_a_url_that_cannot_work_is_refused_at_once(url: str, words: str) -> None:
    """A PolicyError naming what to write, when the store is made, not a TypeError at the
    first guarded call."""
    from cbtasks import PolicyError

    with pytest.raises(PolicyError, match=re.escape(words)):
        RedisStore(url)


def test_kombus_sentinel_form_is_accepted(sentinels: RedisSentinelSet) -> None:
    """sentinel://h1;sentinel://h2 (what a Celery broker behind Sentinel is written as), its
    master named by ?master_name= or, for the broker's own URL, its transport options: the
    same circuit as the redis+sentinel:// form's."""
    from celery import Celery

    from cbtasks.task._options import redis_url

    hosts = ";".join(f"sentinel://127.0.0.1:{port}" for port in sentinels.sentinel_ports)
    app = Celery("kombu-form", broker=hosts, set_as_current=False)
    app.conf.broker_transport_options = {"master_name": "mymaster"}
    url = redis_url(app)
    assert url.endswith("?master_name=mymaster")
    kombu, ours = RedisStore(url), RedisStore(sentinels.url)
    try:
        _trip(CircuitBreaker("kombu-form", policy=POLICY, store=kombu))
        assert CircuitBreaker("kombu-form", policy=POLICY, store=ours).state is State.OPEN
    finally:
        kombu.close()
        ours.close()


def test_a_lost_master_is_said_in_one_short_line(
    sentinels: RedisSentinelSet, caplog: pytest.LogCaptureFixture
) -> None:
    """Master and replica gone, then the sentinels too: redis-py's MasterNotFoundError
    repeats every sentinel client's repr with its error (3 KB); the log says which
    sentinels, which master and the first error, in one short line."""
    sentinels.master.process.kill()
    sentinels.replica.process.kill()
    for sentinel in sentinels._sentinels:
        sentinel.kill()
    caplog.set_level("WARNING", logger="cbtasks")
    deadline = time.monotonic() + 20
    said: list[str] = []
    while time.monotonic() < deadline and not any("MasterNotFoundError" in s for s in said):
        caplog.clear()
        with RedisStore(sentinels.url, retry_interval=0.1) as store:
            breaker = CircuitBreaker("gone-master", store=store)
            assert breaker.call(lambda: "answered") == "answered"  # on_error="local"
        said = [r.getMessage() for r in caplog.records if "Redis" in r.getMessage()]
        time.sleep(0.5)
    lost = [s for s in said if "MasterNotFoundError" in s]
    assert lost, said
    assert all(len(s) < 500 and "\n" not in s for s in said), max(said, key=len)
    assert "mymaster" in lost[0] and "redis+sentinel://127.0.0.1" in lost[0]
