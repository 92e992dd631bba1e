"""The breaker's asyncio forms: ``await breaker.acall(...)``, ``async with breaker:``.

The steps are the synchronous ones (:class:`~cbtasks.CircuitBreaker` decides
locally when it can, asks the store when it must); only the store's round
trips are awaited. An :class:`~cbtasks.AsyncRedisStore` awaits them on
``redis.asyncio``; a :class:`~cbtasks.MemoryStore` answers at once; a
blocking :class:`~cbtasks.RedisStore` is called in a worker thread, so the
event loop is never held by a Redis round trip.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from time import perf_counter
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeVar

from ._classify import retry_hint
from ._errors import CircuitOpenError
from ._state import Mode, Outcome, State
from .stores import MemoryStore
from .stores._base import BreakerStatus, Reply

if TYPE_CHECKING:
    from ._policy import PolicyWire
    from .stores._base import LocalView

_DISABLED = int(Mode.DISABLED)

P = ParamSpec("P")
R = TypeVar("R")

# The calls open in `async with` blocks of this task: (breaker, probe, start).
# A tuple in a context variable, so each asyncio task has its own.
_open_calls: ContextVar[tuple[tuple[object, str | None, float], ...]] = ContextVar(
    "cbtasks_open_calls", default=()
)


def is_async_store(store: object) -> bool:
    """True for a store whose operations are coroutines (AsyncRedisStore)."""
    return inspect.iscoroutinefunction(getattr(store, "admit", None))


class AsyncCalls:
    """The async half of CircuitBreaker (mixed in; it provides the rest)."""

    if TYPE_CHECKING:  # what CircuitBreaker provides
        name: str
        store: Any
        fallback: Callable[..., Any] | None
        _wire: PolicyWire
        _async_store: bool
        _view: LocalView
        _clock: Callable[[], float]

        def _answered_locally(self) -> bool: ...
        def _admission(self, reply: Reply) -> str | None: ...
        def _record_details(
            self, elapsed_ms: float, retry_after: float | None
        ) -> tuple[bool, int]: ...
        def _recorded(self, reply: Reply) -> None: ...
        def classify(self, exc: BaseException) -> Outcome: ...

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """``await fn(*args, **kwargs)`` through the breaker."""
        try:
            probe = await self.aadmit()
        except CircuitOpenError:
            if self.fallback is None:
                raise
            answer = self.fallback(*args, **kwargs)
            return await answer if inspect.isawaitable(answer) else answer  # type: ignore[no-any-return]
        start = perf_counter()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            await self.arecord_exception(probe, exc, (perf_counter() - start) * 1000)
            raise
        await self.arecord(probe, Outcome.SUCCESS, (perf_counter() - start) * 1000)
        return result

    async def aadmit(self) -> str | None:
        """:meth:`admit`, awaiting the store when it must be asked."""
        if self._answered_locally():
            return None
        reply: Reply = await _store_call(self, "admit", new_probe_id())
        return self._admission(reply)

    async def arecord(
        self,
        probe: str | None,
        outcome: Outcome,
        elapsed_ms: float = 0.0,
        retry_after: float | None = None,
    ) -> None:
        """:meth:`record`, awaited."""
        details = self._record_details(elapsed_ms, retry_after)
        self._recorded(await _store_call(self, "record", probe, outcome, *details))

    async def arecord_exception(
        self, probe: str | None, exc: BaseException, elapsed_ms: float
    ) -> None:
        """:meth:`record_exception`, awaited."""
        await self.arecord(probe, self.classify(exc), elapsed_ms, retry_hint(exc))

    async def astatus(self) -> BreakerStatus | None:
        """:meth:`status`, awaited (and this process learns the state it read)."""
        status: BreakerStatus | None = await _store_call(self, "status")
        return status

    async def acircuit(self) -> tuple[State, float]:
        """The state a call would meet now, and seconds until an open circuit probes.

        From this process's view when it knows (no round trip: the answer a
        gateway gives while the circuit is open), else read from the store. A
        disabled breaker (shadow mode) admits every call: it reads as closed;
        so does an AsyncRedisStore's unreachable Redis (each worker's breaker
        decides on its own then), at once during an outage.
        """
        view = self._view
        if view.closed or view.mode == _DISABLED:
            return State.CLOSED, 0.0
        now = self._clock()
        if now < view.reject_until:
            return State.OPEN, view.reject_until - now
        if self._async_store:  # unreachable reads as closed: the workers decide meanwhile
            status = await self.store.status(self.name, self._wire, strict=False)
        else:
            status = await self.astatus()
        if status is None or status.mode is Mode.DISABLED:
            return State.CLOSED, 0.0
        return status.state, status.retry_after

    async def __aenter__(self) -> Self:
        probe = await self.aadmit()
        _open_calls.set((*_open_calls.get(), (self, probe, perf_counter())))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        calls = _open_calls.get()
        at = max(i for i, call in enumerate(calls) if call[0] is self)
        _, probe, start = calls[at]
        _open_calls.set(calls[:at] + calls[at + 1 :])
        elapsed_ms = (perf_counter() - start) * 1000
        if exc is None:
            await self.arecord(probe, Outcome.SUCCESS, elapsed_ms)
        else:
            await self.arecord_exception(probe, exc, elapsed_ms)


async def _store_call(breaker: AsyncCalls, op: str, *args: Any) -> Any:
    """The store's ``op`` for this breaker, without holding the event loop."""
    method = getattr(breaker.store, op)
    if breaker._async_store:
        return await method(breaker.name, breaker._wire, *args)
    if isinstance(breaker.store, MemoryStore):
        return method(breaker.name, breaker._wire, *args)  # no I/O: no thread needed
    return await asyncio.to_thread(method, breaker.name, breaker._wire, *args)


def guard_async(breaker: AsyncCalls, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """``fn``, an ``async def``, with each call guarded by ``breaker``."""

    @functools.wraps(fn)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        return await breaker.acall(fn, *args, **kwargs)

    guarded.breaker = breaker  # type: ignore[attr-defined]
    return guarded


def new_probe_id() -> str:
    """A random id for a call that may become a probe."""
    return os.urandom(8).hex()
