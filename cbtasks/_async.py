"""The decorator's form for ``async def`` functions."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from time import perf_counter
from typing import Any, ParamSpec, Protocol

from ._errors import CircuitOpenError
from ._state import Outcome

P = ParamSpec("P")


class Guard(Protocol):
    """What of a CircuitBreaker the async form uses."""

    fallback: Callable[..., Any] | None

    def admit(self) -> str | None: ...

    def record(self, probe: str | None, outcome: Outcome, elapsed_ms: float = 0.0) -> None: ...

    def record_exception(
        self, probe: str | None, exc: BaseException, elapsed_ms: float
    ) -> None: ...


def guard_async(breaker: Guard, fn: Callable[P, Any]) -> Callable[P, Any]:
    """``fn``, an ``async def``, with each call guarded by ``breaker``."""

    @functools.wraps(fn)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
        try:
            probe = breaker.admit()
        except CircuitOpenError:
            if breaker.fallback is None:
                raise
            result = breaker.fallback(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        start = perf_counter()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            breaker.record_exception(probe, exc, (perf_counter() - start) * 1000)
            raise
        breaker.record(probe, Outcome.SUCCESS, (perf_counter() - start) * 1000)
        return result

    guarded.breaker = breaker  # type: ignore[attr-defined]
    return guarded
