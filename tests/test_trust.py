"""What comes from Redis or the network is a hint at most: forged news, forged state."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from hypothesis import given, settings
from hypothesis import strategies as st

from cbtasks import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitBreakerTask,
    Outcome,
    PolicyError,
    RedisStore,
    State,
    TimeWindow,
)
from cbtasks._testing.redis_server import free_port
from cbtasks.ops.cli import status_rows
from cbtasks.ops.metrics import BreakerCollector
from cbtasks.stores._news import parse_news
from cbtasks.task._completion import CompletionGuard
from cbtasks.task._task import _check_options
from tests.conftest import FakeClock, wait_for


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
        # The forged news made it ask the store, which says closed: calls go through.
        assert breaker.call(lambda: "still ok") == "still ok"
        assert breaker.state is State.CLOSED
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
    # A prefix of its own: other tests' stores listen on cbtasks:news and log too.
    store = RedisStore(redis_url, prefix="garbage-test")
    store.news.view("anything")
    publisher = redis.Redis.from_url(redis_url)
    try:
        wait_for(
            lambda: publisher.publish("garbage-test:news", b"x") and store.news._malformed > 0,
            5,
            "the listener",
        )
        heard = store.news._malformed
        for i in range(200):
            publisher.publish("garbage-test:news", f"garbage {i}".encode())
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


def test_redis_answering_with_errors_follows_on_error(redis_url: str, name: str) -> None:
    """A key of the wrong type: the call is made (on_error='local'), its own outcome kept."""
    store = RedisStore(redis_url)
    breaker = CircuitBreaker(name, store=store)
    redis.Redis.from_url(redis_url).set(f"cbtasks:{{{name}}}:s", "not a hash")
    try:
        assert breaker.call(lambda: "answered") == "answered"
        with pytest.raises(ZeroDivisionError):  # the call's own error, not a StoreError
            breaker.call(lambda: 1 / 0)
        assert store.error_count >= 1
    finally:
        store.close()


def test_the_completion_guard_reports_what_redis_could_not_serve() -> None:
    """A read or mark that fails is told to on_error (the metrics count it), never raised."""
    errors: list[BaseException] = []
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    guard = CompletionGuard(client, "cbtasks", on_error=errors.append)
    assert guard.result_of("task-1") is None
    guard.mark("task-1", {"label": "setosa"}, ttl=60)
    assert len(errors) == 2 and all(isinstance(e, redis.ConnectionError) for e in errors)


def test_the_completion_guard_survives_a_wrong_type(redis_url: str) -> None:
    """A completion key of the wrong type: no mark found, none written, no exception."""
    client = redis.Redis.from_url(redis_url)
    client.hset("cbtasks:done:task-1", "x", "y")
    guard = CompletionGuard(client, "cbtasks")
    assert guard.result_of("task-1") is None
    guard.mark("task-1", {"label": "setosa"}, ttl=60)


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe", b""])
def test_a_corrupt_completion_mark_is_no_mark(redis_url: str, garbage: bytes) -> None:
    """A mark that is not JSON (written by something else, truncated) is read as none: the
    task calls the endpoint, as while Redis is down, instead of failing on the guard."""
    client = redis.Redis.from_url(redis_url)
    client.set("cbtasks:done:task-1", garbage)
    guard = CompletionGuard(client, "cbtasks")
    assert guard.result_of("task-1") is None


@pytest.mark.parametrize(
    "options",
    [
        {"breaker": "my model"},
        {"completion_ttl": 0},
        {"completion_ttl": math.inf},
        {"gc_every": math.nan},
        {"defer_jitter": math.nan},
        {"release_rate": 0},
        {"release_rate": math.nan},
        {"max_deferrals": 2.5},
        {"health_interval": -1},
        {"on_error": "explode"},
        {"redis_timeout": 0},
        {"redis_timeout": 61},
    ],
)
def test_task_options_that_cannot_work_fail_at_registration(options: dict[str, Any]) -> None:
    """Each used to pass registration and fail every task at run time, or silently."""

    def predict() -> None:
        """A task that must never be registered."""

    app = Celery("registration", set_as_current=False)
    option = next(iter(options))
    with pytest.raises(PolicyError, match=option.split("_")[0]):
        app.task(base=CircuitBreakerTask, shared=False, **options)(predict)
        app.finalize(auto=True)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("on_open", "explode"),
        ("release_rate", math.nan),
        ("completion_ttl", 0),
        ("redis_timeout", "fast"),
    ],
)
def test_app_settings_that_cannot_work_stop_the_worker_at_start(setting: str, value: Any) -> None:
    """app.conf.cbtasks_on_open='explode' used to be treated as defer, silently."""
    app = Celery("settings", set_as_current=False)
    app.conf.cbtasks_redis_url = "redis://127.0.0.1:1/0"
    app.conf[f"cbtasks_{setting}"] = value

    @app.task(base=CircuitBreakerTask, shared=False)
    def predict() -> None:
        """A task whose settings are bad."""

    app.finalize(auto=True)
    with pytest.raises(SystemExit, match=setting):
        _check_options(sender=SimpleNamespace(app=app))


@pytest.mark.parametrize(
    ("setting", "value", "words"),
    [
        ("policy", {"failure_treshold": 3}, "cbtasks_policy: unknown field(s) 'failure_treshold' "
         "(did you mean 'failure_threshold'?)"),
        ("policy", {"failure_threshold": 0}, "cbtasks_policy: failure_threshold must be"),
        ("limit", {"iris": {"concurency": 4}}, "cbtasks_limit['iris']: unknown Limit field"),
        ("limit", {"iris": {"rate": "fast"}}, "cbtasks_limit['iris']: rate must be like"),
        ("redis_url", "redis://127.0.0.1:1/0?bogus_option=1", "bogus_option"),
        ("redis_url", "memcached://127.0.0.1:1", "unknown scheme"),
    ],
)  # fmt: skip
def test_settings_a_typo_breaks_stop_the_worker_naming_the_setting(
    setting: str, value: Any, words: str
) -> None:
    """A typo in app.conf.cbtasks_policy (or a limit, or a URL) no longer passes worker
    start to fail every task with a TypeError naming no setting."""
    app = Celery("typos", set_as_current=False)
    app.conf.cbtasks_redis_url = "redis://127.0.0.1:1/0"
    app.conf[f"cbtasks_{setting}"] = value

    @app.task(base=CircuitBreakerTask, shared=False, breaker="iris")
    def predict() -> None:
        """A task whose settings are wrong."""

    app.finalize(auto=True)
    with pytest.raises(SystemExit) as info:
        _check_options(sender=SimpleNamespace(app=app))
    assert words in str(info.value)


def test_a_policy_can_be_a_dict_on_the_task_too() -> None:
    """breaker_policy takes a dict of the policy's fields, as cbtasks_policy does."""
    app = Celery("dicts", set_as_current=False, broker="memory://")

    @app.task(base=CircuitBreakerTask, shared=False, breaker_policy={"failure_threshold": 2})
    def predict() -> None:
        """A task with its policy as a dict."""

    app.finalize(auto=True)
    assert predict.cbtasks_breaker.policy.failure_threshold == 2


def test_options_and_settings_one_edit_away_are_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task option that is a cbtasks option misspelt (Celery keeps any option silently),
    and a cbtasks_ setting nothing reads, are named at worker start."""
    app = Celery("near", set_as_current=False, broker="memory://")
    app.conf.cbtasks_polcy = {"failure_threshold": 2}

    @app.task(base=CircuitBreakerTask, shared=False, brekaer="iris", defer_jiter=0.5)
    def predict() -> None:
        """A task with two options misspelt."""

    app.finalize(auto=True)
    with caplog.at_level("WARNING", logger="cbtasks"):
        _check_options(sender=SimpleNamespace(app=app))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "'brekaer' is not one; did you mean 'breaker'?" in said
    assert "'defer_jiter' is not one; did you mean 'defer_jitter'?" in said
    assert "'cbtasks_polcy' is read by nothing; did you mean 'cbtasks_policy'?" in said


def test_a_tasks_redis_calls_are_bounded_by_its_redis_timeout() -> None:
    """app.conf.cbtasks_redis_timeout reaches the task's store (and its guard and lot)."""
    app = Celery("timeouts", set_as_current=False)
    app.conf.cbtasks_redis_url = "redis://127.0.0.1:1/0"
    app.conf.cbtasks_redis_timeout = 1.5

    @app.task(base=CircuitBreakerTask, shared=False)
    def predict() -> None:
        """A task whose Redis calls may take 1.5 s."""

    app.finalize(auto=True)
    assert predict.cbtasks_store.timeout == 1.5
    assert predict.cbtasks_redis.connection_pool.connection_kwargs["socket_timeout"] == 1.5
    predict.cbtasks_store.close()


@pytest.mark.parametrize("value", ["soon", "0", "-1", "61", "nan"])
def test_the_workers_redis_timeout_setting_says_what_to_write(value: str) -> None:
    from workers.config import from_environment

    with pytest.raises(ValueError, match="CBTASKS_REDIS_TIMEOUT must be a number of seconds"):
        from_environment({"CBTASKS_REDIS_TIMEOUT": value})
    assert from_environment({"CBTASKS_REDIS_TIMEOUT": "2"}).redis_timeout == 2.0


def test_store_and_timeout_mistakes_are_policy_errors(name: str) -> None:
    """A URL where a store goes, a timeout as a string: PolicyError saying what to pass."""
    with pytest.raises(PolicyError, match="RedisStore"):
        CircuitBreaker(name, store="redis://localhost:6379/0")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="timeout"):
        RedisStore("redis://localhost:6379/0", timeout="1")  # type: ignore[arg-type]


def test_an_operators_close_clears_a_time_window_whatever_policy_it_sends(
    redis_url: str, name: str, clock: FakeClock
) -> None:
    """The CLI sends the default policy: a TimeWindow breaker's counts must not go negative."""
    policy = BreakerPolicy(
        failure_threshold=100, failure_rate=0.9, window=TimeWindow(seconds=10), min_calls=100
    )
    store = RedisStore(redis_url, clock=clock)
    breaker = CircuitBreaker(name, policy=policy, store=store)
    try:
        for _ in range(5):
            breaker.record(breaker.admit(), Outcome.FAILURE)
        store.control(name, BreakerPolicy().wire(), "force_close")  # as `cbtasks close` does
        clock.advance(11)
        breaker.record(breaker.admit(), Outcome.SUCCESS)
        status = breaker.status()
        assert status is not None
        assert (status.window_calls, status.window_failures) == (1, 0)
    finally:
        store.close()


def test_corrupt_state_is_shown_as_such_and_the_rest_still_listed(redis_url: str) -> None:
    """st=7, md=9, a key of the wrong type: `cbtasks status` and the metrics say "corrupt"
    for those and list every other breaker, sorted before or after them."""
    store = RedisStore(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        for name in ("a-fine", "z-fine"):
            CircuitBreaker(name, store=store).call(lambda: None)
        client.hset("cbtasks:{b-state}:s", mapping={"st": 7, "vn": 1})
        client.hset("cbtasks:{c-mode}:s", mapping={"md": 9, "vn": 1})
        client.set("cbtasks:{d-type}:s", "not a hash")
        rows = {row["name"]: row["state"] for row in status_rows(store)}
        assert rows == {
            "a-fine": "closed",
            "b-state": "corrupt",
            "c-mode": "corrupt",
            "d-type": "corrupt",
            "z-fine": "closed",
        }
        families = {f.name: f for f in BreakerCollector(store).collect()}
        states = {
            (s.labels["breaker"], s.labels["state"])
            for s in families["cbtasks_breaker_state"].samples
            if s.value == 1.0
        }
        assert states == {
            ("a-fine", "closed"),
            ("b-state", "corrupt"),
            ("c-mode", "corrupt"),
            ("d-type", "corrupt"),
            ("z-fine", "closed"),
        }
    finally:
        store.close()


def test_the_redis_password_stays_out_of_celerys_reports() -> None:
    """`celery inspect conf`, `celery report` and Flower print settings: masked there."""
    from celery.app.utils import bugreport

    app = Celery("report", set_as_current=False)
    app.conf.cbtasks_redis_url = "redis://ops:s3cret-pw@redis.internal:6379/0"
    assert "s3cret-pw" not in json.dumps(app.conf.table(with_defaults=False), default=str)
    assert "s3cret-pw" not in bugreport(app)


@pytest.mark.parametrize("password", ["pa/ss-word", "pa#ss-word", "pa?ss-word", "pa@ss-word"])
def test_a_malformed_url_never_prints_its_password(password: str) -> None:
    """A '/', '#', '?' or '@' in a password used to print part of it in the error."""
    url = f"redis://ops:{password}@redis.internal:6379/0"
    try:
        store = RedisStore(url)
    except PolicyError as exc:
        message = str(exc)
    else:
        message = repr(store) + str(store.outage.error_count)
        store.close()
    for piece in {password, *re.split(r"[/#?@]", password)}:
        if len(piece) >= 3:
            assert piece not in message, message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_example_app_takes_only_finite_numbers(bad: float) -> None:
    """NaN features are the caller's error before any call (six of them kept the circuit open)."""
    from cbtasks import CallerError
    from workers.app import validate_features

    with pytest.raises(CallerError, match="finite"):
        validate_features([1.0, bad, 3.0, 4.0])
