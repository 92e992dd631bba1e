"""Testing your own tasks: a pytest plugin, loaded by pytest when cbtasks is installed.

Its one fixture, ``cbtasks``, is a :class:`BreakerControl`: force a breaker
open, half-open or closed on whatever store the app uses (``memory://`` in
tests, Redis in an integration suite), keep breaker state in the test's own
process, and read what tasks did with the requests their breakers refused::

    def test_an_open_circuit_serves_the_default(cbtasks, celery_app):
        cbtasks.use(celery_app).memory()
        cbtasks.open("sentiment-model")
        assert predict.delay([1.0]).get()["cbtasks_fallback"] == "default"
        assert cbtasks.fallbacks[0].kind == "default"

It works with ``task_always_eager`` (an open circuit: the fallback, or
``CircuitOpenError`` for the caller: there is no queue to defer to) and with
``celery.contrib.pytest``'s embedded worker (a request is deferred by
countdown, and ``cbtasks.deferred`` says with what countdown). Importing
this module costs nothing more than pytest itself: cbtasks is imported when
the fixture is first used.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker

__all__ = ["BreakerControl", "cbtasks"]


class BreakerControl:
    """Breakers of one Celery app, for a test: commands, and what their tasks did.

    ``deferred``, ``fallbacks``, ``failed`` and ``refused`` are the events
    (:class:`~cbtasks.RequestDeferred`, :class:`~cbtasks.FallbackServed`,
    :class:`~cbtasks.RequestFailed`, :class:`~cbtasks.CallRejected`) of every
    breaker in this process since the fixture began, in order.
    """

    def __init__(self) -> None:
        from celery import current_app

        from ._events import watch

        self.app: Any = current_app
        self.events: list[Any] = []
        self._memory_set: list[tuple[Any, Any]] = []
        self._stores: dict[str, Any] = {}
        self._touched: set[str] = set()
        watch(self.events.append)

    # -- which app, which store -------------------------------------------------------

    def use(self, app: Any) -> BreakerControl:
        """Control the breakers of ``app`` (default: Celery's current app)."""
        self.app = app
        return self

    def memory(self) -> BreakerControl:
        """Keep the app's breaker state in this process for the test (``memory://``),
        fresh: no Redis needed, nothing shared with other processes."""
        from .stores._memory import process_store

        self._memory_set.append((self.app, self.app.conf.get("cbtasks_redis_url")))
        self.app.conf.cbtasks_redis_url = "memory://"
        process_store().reset_all()
        return self

    @property
    def store(self) -> Any:
        """The store the app's tasks use: the process's MemoryStore, or a RedisStore."""
        from .stores import RedisStore
        from .stores._memory import process_store
        from .task._options import MEMORY_URL, redis_url

        url = redis_url(self.app)
        if url == MEMORY_URL:
            return process_store()
        if url not in self._stores:
            self._stores[url] = RedisStore(url)
        return self._stores[url]

    def breaker(self, name: str) -> CircuitBreaker:
        """The breaker ``name`` of the app's tasks (its policy, its limit), else one of the
        app's store with the default policy: for commands and its status."""
        from ._breaker import CircuitBreaker
        from .task import CircuitBreakerTask

        self._touched.add(name)
        for task in list(self.app.tasks.values()):
            if isinstance(task, CircuitBreakerTask) and task.cbtasks_breaker_name == name:
                return task.cbtasks_breaker
        return CircuitBreaker(name, store=self.store)

    # -- commands ----------------------------------------------------------------------

    def open(self, name: str) -> None:
        """Open ``name``'s circuit until :meth:`close` or :meth:`reset` (an operator's open)."""
        self.breaker(name).force_open()

    def half_open(self, name: str) -> None:
        """Half-open now: the next calls are probes and decide."""
        self.breaker(name).force_half_open()

    def close(self, name: str) -> None:
        """Close ``name``'s circuit now."""
        self.breaker(name).force_close()

    def reset(self, name: str | None = None) -> None:
        """Forget ``name``'s state (every breaker this control touched when None)."""
        for each in [name] if name is not None else sorted(self._touched):
            self.breaker(each).reset()

    def state(self, name: str) -> str:
        """``name``'s state now: "closed", "open" or "half_open"."""
        return self.breaker(name).state.value

    # -- what tasks did ------------------------------------------------------------------

    @property
    def deferred(self) -> list[Any]:
        """Requests deferred: ``mode`` ("countdown", "park"), ``countdown`` (seconds)."""
        from ._events import RequestDeferred

        return [e for e in self.events if isinstance(e, RequestDeferred)]

    @property
    def fallbacks(self) -> list[Any]:
        """Requests answered by a fallback: ``kind`` ("default", "cached", ...)."""
        from ._events import FallbackServed

        return [e for e in self.events if isinstance(e, FallbackServed)]

    @property
    def failed(self) -> list[Any]:
        """Requests not run that fail (``on_open="fail"``, or their deferrals exhausted)."""
        from ._events import RequestFailed

        return [e for e in self.events if isinstance(e, RequestFailed)]

    @property
    def refused(self) -> list[Any]:
        """Calls refused without reaching the endpoint: ``by`` circuit or a limit's part."""
        from ._events import CallRejected

        return [e for e in self.events if isinstance(e, CallRejected)]

    def close_all(self) -> None:
        """The fixture's teardown: breakers touched are reset, settings put back."""
        from ._events import unwatch
        from .stores._memory import process_store

        unwatch(self.events.append)
        try:
            self.reset()
        finally:
            for app, url in reversed(self._memory_set):
                app.conf.cbtasks_redis_url = url
            process_store().reset_all()
            for store in self._stores.values():
                store.close()


@pytest.fixture
def cbtasks() -> Iterator[BreakerControl]:
    """Breakers of the app under test: force them open, half-open or closed, keep their
    state in this process (``.memory()``), see what tasks did with refused requests; every
    breaker touched is reset afterwards."""
    control = BreakerControl()
    try:
        yield control
    finally:
        control.close_all()
