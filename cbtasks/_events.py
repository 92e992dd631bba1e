"""What happened to a breaker's calls and requests: one stream of events per breaker.

The breaker emits :class:`CallRecorded` for every call it counts (once, the
task's own retries included), :class:`CallRejected` for every call it
refuses, :class:`~cbtasks.StateChange` for every transition this process
makes and :class:`HealthChecked` for each health check; a
:class:`~cbtasks.CircuitBreakerTask` adds what it did with a refused or
failed request (:class:`RequestDeferred`, :class:`FallbackServed`,
:class:`RequestFailed`) and, when a deferred request runs at last,
:class:`RequestWaited`. The Prometheus metrics, Flower's task events, the
``cbtasks waited`` record and the breaker's ``listeners`` are subscribers;
``breaker.events.subscribe(fn)`` adds yours.

A subscriber runs on the thread that emits and must be quick; one that
raises is logged and the others still run: watching never fails a call.

:func:`watch` adds a subscriber of every breaker's events in this process
(the test plugin's recorder), whichever breaker emits and whenever it was made.

Instrumentation (the Prometheus metrics) is found by name, as Celery finds its
plugins: :data:`INSTRUMENTATION` lists ``module:object`` paths of objects with
``observe(event)`` and ``store_error(exc)``; a task subscribes what imports
(prometheus_client installed) through :func:`instruments`. The layers below
never import the ones above: the dependency is a name here, not an import.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ._state import Outcome, StateChange

__all__ = [
    "CallRecorded",
    "CallRejected",
    "Event",
    "Events",
    "FallbackServed",
    "HealthChecked",
    "RequestDeferred",
    "RequestFailed",
    "RequestWaited",
    "instruments",
    "store_error",
    "unwatch",
    "watch",
]

log = logging.getLogger("cbtasks")


@dataclass(frozen=True, slots=True)
class CallRecorded:
    """A call was made and counted: ``outcome``, ``seconds`` it took (None: not timed)."""

    breaker: str
    outcome: Outcome
    seconds: float | None
    slow: bool
    #: It was a half-open probe.
    probe: bool


@dataclass(frozen=True, slots=True)
class CallRejected:
    """A call was refused without being made: by its circuit, or by its limit."""

    breaker: str
    reason: str
    retry_after: float
    #: What refused it: "circuit", or the limit's "concurrency", "rate" or "tokens".
    by: str = "circuit"


@dataclass(frozen=True, slots=True)
class HealthChecked:
    """A health check was made while the circuit was open (by this process, for the fleet)."""

    breaker: str
    healthy: bool
    #: What the check raised, if it raised (a timeout, a refused connection).
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class RequestDeferred:
    """A task's request waits for the circuit: by ``mode`` "countdown" or "park"."""

    breaker: str
    mode: str
    #: The rejection (or failed call) it waits out: reason and retry_after.
    error: Any
    deferrals: int
    #: Seconds until it is delivered again (countdown mode), else None.
    countdown: float | None
    task: Any


@dataclass(frozen=True, slots=True)
class FallbackServed:
    """A task's request was answered by its fallback of ``kind``."""

    breaker: str
    kind: str
    error: Any
    task: Any


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """A task's request was not run and fails (on_open="fail", or deferrals exhausted)."""

    breaker: str
    error: Any
    task: Any


@dataclass(frozen=True, slots=True)
class RequestWaited:
    """A deferred request runs at last, ``seconds`` after its first deferral."""

    breaker: str
    mode: str
    seconds: float
    task: Any


Event = (
    CallRecorded
    | CallRejected
    | StateChange
    | HealthChecked
    | RequestDeferred
    | FallbackServed
    | RequestFailed
    | RequestWaited
)
Subscriber = Callable[[Event], object]


class Instrument(Protocol):
    """What observes a fleet's breakers for operators: their events, the store's errors."""

    def observe(self, event: Event) -> None: ...

    def store_error(self, exc: BaseException) -> None: ...


#: The instrumentation a task subscribes, by ``module:callable`` returning an Instrument.
INSTRUMENTATION: list[str] = ["cbtasks.ops.metrics:metrics"]
_instruments: tuple[Instrument, ...] | None = None
_instruments_lock = threading.Lock()


def instruments() -> tuple[Instrument, ...]:
    """The instrumentation of this process, each of INSTRUMENTATION that imports (made once;
    one whose library is missing is left out)."""
    global _instruments
    with _instruments_lock:
        if _instruments is None:
            found = []
            for path in INSTRUMENTATION:
                module, _, name = path.partition(":")
                try:
                    found.append(getattr(importlib.import_module(module), name)())
                except ImportError as exc:
                    log.debug("instrumentation %s left out: %s", path, exc)
            _instruments = tuple(found)
        return _instruments


def store_error(exc: BaseException) -> None:
    """A Redis call of a store, a guard or a lot failed: told to every instrument."""
    for instrument in instruments():
        try:
            instrument.store_error(exc)
        except Exception:  # watching never fails a call
            log.exception("instrument %r failed on a store error", instrument)


# Subscribers of every breaker's events (watch / unwatch): a tuple, replaced whole.
_watchers: tuple[Subscriber, ...] = ()


def watch(subscriber: Subscriber) -> None:
    """Call ``subscriber(event)`` for the events of every breaker of this process."""
    global _watchers
    _watchers = (*_watchers, subscriber)


def unwatch(subscriber: Subscriber) -> None:
    """Stop a :func:`watch`."""
    global _watchers
    _watchers = tuple(w for w in _watchers if w is not subscriber)


class Events:
    """The subscribers of one breaker's events, called in order on the emitting thread."""

    __slots__ = ("_subscribers",)

    def __init__(self) -> None:
        self._subscribers: tuple[Subscriber, ...] = ()

    def __bool__(self) -> bool:
        """True when anyone listens: emitters skip building an event otherwise."""
        return bool(self._subscribers) or bool(_watchers)

    def __repr__(self) -> str:
        return f"Events(subscribers={len(self._subscribers)})"

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber(event)`` for every event from now on."""
        if not callable(subscriber):
            from ._errors import PolicyError

            raise PolicyError(f"an event subscriber must be callable, got {subscriber!r}")
        # A new tuple: emit() iterates the one it read, whatever is added meanwhile.
        self._subscribers = (*self._subscribers, subscriber)

    def emit(self, event: Event) -> None:
        """Hand ``event`` to every subscriber; one that raises is logged, the rest still run."""
        for subscriber in self._subscribers + _watchers:
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber %r failed on %r", subscriber, event)


def only_state_changes(listener: Callable[[StateChange], object]) -> Subscriber:
    """A breaker's ``listeners`` hear its transitions only, as they always did."""

    def subscriber(event: Event) -> None:
        if isinstance(event, StateChange):
            listener(event)

    subscriber.__qualname__ = f"only_state_changes({listener!r})"
    return subscriber
