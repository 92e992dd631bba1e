"""What comes from Redis or the network is a hint at most: forged news, forged state."""

from __future__ import annotations

import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from cbtasks import BreakerPolicy, CircuitBreaker, RedisStore, State
from cbtasks.stores._news import parse_news
from tests.conftest import wait_for


def test_forged_news_cannot_open_a_circuit(redis_url: str, name: str) -> None:
    """'Open for 11 days, version 2^63': the process asks the store, which says closed."""
    store = RedisStore(redis_url)
    breaker = CircuitBreaker(name, store=store)
    publisher = redis.Redis.from_url(redis_url)
    try:
        assert breaker.call(lambda: "ok") == "ok"
        forged = f"{name}\n9223372036854775807\n1\n999999999\n0".encode()
        heard = store.news.view(name)
        wait_for(
            lambda: publisher.publish("cbtasks:news", forged) and heard.version == -1,
            5,
            "the forged news to be heard",
        )
        assert breaker.call(lambda: "still ok") == "still ok"
        assert breaker.state is State.CLOSED
        assert heard.closed  # learnt again from the store's reply
    finally:
        store.close()


def test_a_forged_state_hash_is_bounded_by_the_policy(redis_url: str, name: str) -> None:
    """'Open until the year 2300' in Redis: this process rejects locally only as long as
    the policy could have opened it, then asks again."""
    policy = BreakerPolicy(failure_threshold=1, open_seconds=1, max_open_seconds=2)
    store = RedisStore(redis_url)
    breaker = CircuitBreaker(name, policy=policy, store=store)
    client = redis.Redis.from_url(redis_url)
    try:
        client.hset(f"cbtasks:{{{name}}}:s", mapping={"st": 1, "ou": 10**13, "vn": 5})
        try:
            breaker.call(lambda: None)
        except Exception as exc:
            assert type(exc).__name__ == "CircuitOpenError"
        view = store.news.view(name)
        assert view.reject_until - store.local_clock() <= 2.0 * (1 + policy.jitter) + 0.01
    finally:
        store.close()


def test_garbage_news_is_logged_once_not_per_message(redis_url: str, caplog) -> None:  # type: ignore[no-untyped-def]
    """200 malformed publishes: one warning (and a count), not 200."""
    store = RedisStore(redis_url)
    store.news.view("anything")
    publisher = redis.Redis.from_url(redis_url)
    try:
        # Other subscribers may listen on this Redis: wait until this one hears.
        wait_for(
            lambda: publisher.publish("cbtasks:news", b"x") and store.news._malformed > 0,
            5,
            "the listener",
        )
        heard = store.news._malformed
        for i in range(200):
            publisher.publish("cbtasks:news", f"garbage {i}".encode())
        wait_for(lambda: store.news._malformed >= heard + 200, 5, "the garbage to be heard")
        warnings = [r for r in caplog.records if "malformed breaker news" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        store.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_the_news_parser_takes_any_bytes(data: bytes) -> None:
    """Arbitrary bytes: a parsed message or None, never an exception."""
    news = parse_news(data)
    assert news is None or isinstance(news.version, int)
