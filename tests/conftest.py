"""Shared fixtures: a real redis-server per session, fake clocks, both stores."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest
import redis

from cbtasks import AsyncRedisStore, MemoryStore, RedisStore, Store
from cbtasks._testing.redis_server import RedisServer
from tests.async_adapter import BlockingAsyncStore

# celery.contrib.pytest's embedded app and worker, as users run their own tests.
pytest_plugins = ("celery.contrib.pytest",)

_names = itertools.count()


@contextlib.contextmanager
def worker_tasks_on(redis_url: str, env: dict[str, str]) -> Iterator[ModuleType]:
    """``tests.worker_tasks`` (its app and tasks) sending to ``redis_url``, with ``env`` in
    the environment, for one module's tests; then both put back.

    Every module that runs real workers shares that app, and Celery keeps what it made
    for the first broker and result backend it used (connection and producer pools, the
    backend): without dropping them a later module's tasks go to a Redis that has gone.
    """
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    from tests import worker_tasks

    app = worker_tasks.app
    before = {key: app.conf.get(key) for key in ("broker_url", "result_backend")}
    before["cbtasks_redis_url"] = app.conf.get("cbtasks_redis_url")
    _forget_connections(app)
    app.conf.update(broker_url=redis_url, result_backend=redis_url, cbtasks_redis_url=redis_url)
    try:
        yield worker_tasks
    finally:
        _forget_connections(app)
        app.conf.update(before)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _forget_connections(app: object) -> None:
    """What Celery drops in a forked child (``Celery._after_fork``), and the backend."""
    pool = getattr(app, "_pool", None)
    if pool is not None:
        pool.force_close_all()
    app._pool = None  # type: ignore[attr-defined]
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    app._backend_cache = None  # type: ignore[attr-defined]
    app._local = threading.local()  # type: ignore[attr-defined]


class FakeClock:
    """Seconds since the epoch that only move when a test moves them."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        # Whole milliseconds, as the stores count, so steps add up exactly.
        self.now_ms = round(start * 1000)

    @property
    def now(self) -> float:
        return self.now_ms / 1000

    def __call__(self) -> float:
        return self.now_ms / 1000

    def advance(self, seconds: float) -> None:
        self.now_ms += round(seconds * 1000)


def wait_for(
    condition: Callable[[], object],
    timeout: float = 10.0,
    what: str = "",
    seen: Callable[[], object] | None = None,
) -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` seconds, saying what
    ``seen()`` returns then (what was there instead)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            instead = f"; seen: {seen()!r}" if seen is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}{instead}")
        time.sleep(0.01)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's process logs (workers, gateway) end its report: CI keeps no files."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and tmp_path is not None:
        for log_file in sorted(tmp_path.glob("*.log")):
            tail = log_file.read_text(errors="replace").splitlines()[-LOG_LINES_ON_FAILURE:]
            report.sections.append((f"last lines of {log_file.name}", "\n".join(tail)))


LOG_LINES_ON_FAILURE = 40


@pytest.fixture(autouse=True)
def _root_log_level() -> Iterator[None]:
    """celery.contrib.pytest's worker leaves the root logger at ERROR for the rest of the
    process (Celery's log setup): put it back, so a later test's caplog hears warnings."""
    level = logging.root.level
    yield
    logging.root.setLevel(level)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    yield redis_server.url
    # Our own server, started above: safe to empty after each test.
    redis.Redis.from_url(redis_server.url).flushall()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def name() -> str:
    return f"model-{next(_names)}"


# `make mutate` mutates the Python machine, not the Lua one: the memory store
# alone tells a mutant apart there, in half the time.
STORES = ["memory"] if os.environ.get("CBTASKS_MUTATION") else ["memory", "redis", "async-redis"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, clock: FakeClock) -> Iterator[Store]:
    """Each store in turn (the async one driven from blocking code), on the test's fake clock."""
    yield from open_store(request.param, request, clock)


def open_store(kind: str, request: pytest.FixtureRequest, clock: FakeClock) -> Iterator[Store]:
    """A store of ``kind`` (one of STORES) on ``clock``, closed afterwards."""
    if kind == "memory":
        yield MemoryStore(clock=clock)
        return
    url = request.getfixturevalue("redis_url")
    if kind == "async-redis":
        async_store = BlockingAsyncStore(AsyncRedisStore(url, clock=clock))
        yield async_store  # type: ignore[misc]
        async_store.close()
        return
    redis_store = RedisStore(url, clock=clock)
    yield redis_store
    redis_store.close()
