"""Answers for a request whose circuit is open: the four the domain asks for.

Each fallback is a small callable object, ``fallback(task, args, kwargs)``,
that returns a *marked* result (see :func:`mark`), so a pipeline can count
fallbacks apart from real predictions:

- :class:`CachedResult`: the last good result for the same input, kept in Redis.
- :class:`DefaultPrediction`: a fixed answer.
- :class:`SimplerModel`: another callable or Celery task, run in-process.
- :class:`EnqueueForLater`: send the request to a queue for async processing
  and answer now that it was queued.

A plain callable works too: ``fallback=lambda *args, **kwargs: ...`` (kind
``"callable"``). A fallback that cannot answer raises :class:`NoFallback`;
the request then ends as a failure with :class:`~cbtasks.CircuitOpenError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from .stores._connection import REDIS_TROUBLE, cause

__all__ = [
    "CachedResult",
    "DefaultPrediction",
    "EnqueueForLater",
    "Fallback",
    "NoFallback",
    "SimplerModel",
    "is_fallback",
    "mark",
]

log = logging.getLogger("cbtasks.fallbacks")

#: The key that marks a result as a fallback's.
MARK = "cbtasks_fallback"


class NoFallback(Exception):
    """This fallback has no answer for this request (a cache miss, say)."""


class Fallback(Protocol):
    """What a task calls for an answer while its circuit is open.

    A task's fallback takes ``(task, args, kwargs)``, so it can reach the task's
    Redis, name or app (a breaker's own ``fallback=`` takes the call's
    ``*args, **kwargs``, as the guarded function does). Two hooks are optional,
    looked up by name, never by type, so a fallback of your own can have them:

    - ``remember(task, args, kwargs, result)``: called after each successful
      call (a cache keeps the result);
    - ``answer(task, args, kwargs) -> (kind, value)``: what answered, where that
      is not always this fallback (a cache miss answered by its ``otherwise``).
    """

    kind: str

    def __call__(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...


def mark(kind: str, result: Any, reason: str = "") -> dict[str, Any]:
    """A fallback's result, marked as one: ``{"cbtasks_fallback": kind, "result": ...}``."""
    return {MARK: kind, "result": result, "reason": reason}


def is_fallback(result: object) -> bool:
    """True if ``result`` came from a fallback rather than the endpoint."""
    return isinstance(result, dict) and MARK in result


class DefaultPrediction:
    """Answer with a fixed value."""

    kind = "default"

    def __init__(self, value: Any) -> None:
        json.dumps(value)  # fails now, not during an outage, if it cannot be a result
        self.value = value

    def __repr__(self) -> str:
        return f"DefaultPrediction({self.value!r})"

    def __call__(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.value


class SimplerModel:
    """Answer with another model: a callable, or a Celery task run in this process."""

    kind = "simpler_model"

    def __init__(self, model: Callable[..., Any]) -> None:
        if not callable(model):
            raise TypeError(f"SimplerModel needs a callable or a task, got {model!r}")
        self.model = model

    def __repr__(self) -> str:
        return f"SimplerModel({self.model!r})"

    def __call__(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.model(*args, **kwargs)


class CachedResult:
    """Answer with the last good result for the same arguments.

    Every successful call of the task stores its result in Redis for ``ttl``
    seconds, keyed by the task's name and a hash of its arguments. On a
    miss, ``otherwise`` answers if given, else :class:`NoFallback`.
    """

    kind = "cached"

    def __init__(self, ttl: float = 3600.0, otherwise: Fallback | None = None) -> None:
        if not 0 < ttl <= 30 * 24 * 3600:
            raise ValueError(
                f"ttl must be a number of seconds above 0 and at most 30 days, got {ttl!r}"
            )
        self.ttl = ttl
        self.otherwise = otherwise

    def __repr__(self) -> str:
        return f"CachedResult(ttl={self.ttl!r}, otherwise={self.otherwise!r})"

    def key(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        digest = hashlib.sha256(
            json.dumps([list(args), kwargs], sort_keys=True, default=str).encode()
        ).hexdigest()
        return f"{task.cbtasks_prefix}:cache:{task.name}:{digest}"

    def remember(
        self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        """Keep a good result for later (called by the task after each success)."""
        try:
            encoded = json.dumps(result)
        except (TypeError, ValueError):
            return  # not JSON: Celery could not have sent it either
        task.cbtasks_redis.set(self.key(task, args, kwargs), encoded, px=int(self.ttl * 1000))

    def __call__(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.answer(task, args, kwargs)[1]

    def answer(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any]:
        """``(kind, value)``: "cached" and the result, else what ``otherwise`` answered."""
        try:
            cached = task.cbtasks_redis.get(self.key(task, args, kwargs))
        except REDIS_TROUBLE as exc:  # the cache is out of reach: a miss, not a failure
            log.warning("cannot read the cached result of %s (%s)", task.name, cause(exc))
            cached = None
        if cached is not None:
            return self.kind, json.loads(cached)
        if self.otherwise is not None:
            return answer(self.otherwise, task, args, kwargs)
        raise NoFallback("no cached result for these arguments")


class EnqueueForLater:
    """Queue the request for async processing on ``queue``; answer that it was queued."""

    kind = "enqueued"

    def __init__(self, queue: str, countdown: float = 0.0) -> None:
        if not queue:
            raise ValueError("EnqueueForLater needs the name of the queue to send requests to")
        self.queue = queue
        self.countdown = countdown

    def __repr__(self) -> str:
        return f"EnqueueForLater(queue={self.queue!r})"

    def __call__(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        later = task.apply_async(args, kwargs, queue=self.queue, countdown=self.countdown or None)
        return {"queued": True, "task_id": later.id, "queue": self.queue}


def answer(
    fallback: Fallback, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, Any]:
    """``(kind, value)``: the value and the kind of the fallback that actually answered
    (a CachedResult with nothing cached answers with its ``otherwise``): the
    fallback's own ``answer`` hook where it has one."""
    own = getattr(fallback, "answer", None)
    if callable(own):
        kind, value = own(task, args, kwargs)
        return str(kind), value
    return fallback.kind, fallback(task, args, kwargs)


def remember(
    fallback: Fallback | None, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
) -> None:
    """Hand a good result to the fallback's ``remember`` hook, where it has one."""
    hook = getattr(fallback, "remember", None)
    if callable(hook):
        hook(task, args, kwargs, result)


def as_fallback(value: Any) -> Fallback | None:
    """A Fallback from what a task was given: a Fallback, a plain callable, or None."""
    if value is None or hasattr(value, "kind"):
        return value  # type: ignore[no-any-return]
    if not callable(value):
        raise TypeError(f"fallback must be callable or one of cbtasks.fallbacks, got {value!r}")
    return _PlainCallable(value)


class _PlainCallable:
    kind = "callable"

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __repr__(self) -> str:
        return f"fallback {self.fn!r}"

    def __call__(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.fn(*args, **kwargs)
