"""CircuitBreaker: admit a call, make it, record how it went."""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from time import perf_counter
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar, cast

from ._classify import Classifier, failure_text, judge, retry_hint
from ._errors import CallRefused, CircuitOpenError, LimitExceeded, PolicyError
from ._events import CallRecorded, CallRejected, Events, HealthChecked, only_state_changes
from ._health import HealthCheck, HealthChecker, health_checker
from ._limit import RATE, REFUSED_BY, Limit
from ._machine import HALF_OPEN, OPEN
from ._policy import BreakerPolicy, with_shorthand
from ._state import STATE_BY_CODE, Mode, Outcome, State, StateChange
from .stores import MemoryStore, RedisStore
from .stores._base import (
    HEALTHY,
    AsyncStore,
    BreakerStatus,
    CallResult,
    HistoryEntry,
    Reply,
    Store,
    validate_name,
)

__all__ = ["CircuitBreaker", "Ticket", "report_tokens"]

log = logging.getLogger("cbtasks")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
Listener = Callable[[StateChange], object]

# The calls open in `async with` blocks of this task: (breaker, ticket, start,
# token cell). A tuple in a context variable, so each asyncio task has its own.
_open_calls: ContextVar[tuple[tuple[Any, ...], ...]] = ContextVar("cbtasks_open_calls", default=())

# The tokens a guarded call reports (report_tokens), in a cell per call: a
# context variable, so each thread and asyncio task has its own.
_reported_tokens: ContextVar[list[int | None] | None] = ContextVar(
    "cbtasks_reported_tokens", default=None
)

_unnamed = itertools.count(1)
_DISABLED = int(Mode.DISABLED)  # a plain int: compared on every rejection
# An endpoint's Retry-After keeps the circuit open that long, up to an hour.
_MAX_RETRY_AFTER_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted call, as :meth:`CircuitBreaker.admit` returns it: pass it to ``record``.

    ``probe_id`` names a half-open probe, ``slot`` the slot the call holds
    under a concurrency limit, ``tokens`` what it reserved of a token budget.
    """

    probe_id: str | None
    slot: str | None = None
    tokens: int = 0


def report_tokens(used: int) -> None:
    """Say how many tokens the guarded call running now used (a token budget settles it).

    Call it inside a call guarded by a breaker whose :class:`~cbtasks.Limit`
    has ``tokens=``: the decorator, ``call``, ``acall``, streams, or a
    :class:`~cbtasks.CircuitBreakerTask`'s body. It overrides what the limit's
    ``usage`` would read from the result.
    """
    if isinstance(used, bool) or not isinstance(used, int) or used < 0:
        raise PolicyError(f"report_tokens takes a whole number of tokens, got {used!r}")
    cell = _reported_tokens.get()
    if cell is None:
        raise PolicyError(
            "report_tokens() is called outside a call guarded by a breaker with a token "
            "budget: call it inside the guarded function (Limit(tokens=...))"
        )
    cell[0] = used


class CircuitBreaker:
    """A circuit breaker around calls to one endpoint.

    The small form: ``CircuitBreaker(fail_max=5, reset_timeout=10)`` decorates
    a function; after ``fail_max`` consecutive failures calls raise
    :class:`CircuitOpenError` (or return ``fallback(*args, **kwargs)``) without
    running it, and after ``reset_timeout`` seconds a probe call decides
    whether it closes again.

    The full form: ``CircuitBreaker(name, policy=BreakerPolicy(...),
    store=RedisStore(...))``: every process using the same name and store
    shares one circuit. ``listeners`` are called with a :class:`StateChange`
    for each transition this process makes. With ``health_check`` (a callable
    returning true when the endpoint looks healthy), one process of the fleet
    calls it every ``health_interval`` seconds while the circuit is open, and
    a pass makes it half-open at once; only the probes then close it. A check
    that has not answered in ``health_timeout`` seconds counts as failed
    (``HealthChecked.error`` a TimeoutError).

    ``classify`` (a callable taking the exception a call raised and returning
    an :class:`Outcome`, or None to let the defaults decide) is asked before
    the policy's own ``classify`` and the defaults, which know the exceptions
    of httpx, requests, aiohttp, grpc, openai, tritonclient, botocore,
    huggingface_hub and text-generation (see :func:`cbtasks.default_classify`).

    ``limit`` (a :class:`~cbtasks.Limit`) keeps the fleet below the endpoint's
    capacity: calls in flight, per second, tokens per period, or an adaptive
    concurrency limit. A call over it raises :class:`~cbtasks.LimitExceeded`
    (or gets the fallback) after waiting up to ``limit.wait`` seconds; it
    never counts as a failure. Calls that do reach the endpoint count as ever.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        policy: BreakerPolicy | None = None,
        store: Store | AsyncStore | None = None,
        fail_max: int | None = None,
        reset_timeout: float | None = None,
        fallback: Callable[..., Any] | None = None,
        listeners: Iterable[Listener] = (),
        health_check: HealthCheck | None = None,
        health_interval: float = 1.0,
        classify: Classifier | None = None,
        limit: Limit | None = None,
        health_timeout: float = 5.0,
    ) -> None:
        policy = with_shorthand(policy or BreakerPolicy(), fail_max, reset_timeout)
        limit = Limit.coerce(limit)
        if name is None:
            if isinstance(store, RedisStore):
                raise PolicyError(
                    "a breaker that shares its state through Redis needs a name: "
                    "CircuitBreaker('model-a', store=...)"
                )
            name = f"breaker-{next(_unnamed)}"
        if fallback is not None and not callable(fallback):
            raise PolicyError(f"fallback must be callable, got {fallback!r}")
        self.name = validate_name(name)
        self.policy = policy
        if store is not None and not all(
            callable(getattr(store, op, None)) for op in ("view", "admit", "record", "control")
        ):
            raise PolicyError(
                f"store must be a MemoryStore, a RedisStore or another Store, got {store!r}; "
                "to share state through Redis pass store=RedisStore('redis://...')"
            )
        # Any: a Store, or an AsyncStore whose methods only the async forms call.
        self.store: Any = store if store is not None else MemoryStore()
        self.fallback = fallback
        #: Every call counted or refused, every transition, every health check (see
        #: cbtasks._events): the metrics, Flower and ``listeners`` subscribe here.
        self.events = Events()
        for listener in listeners:
            self.add_listener(listener)
        #: The endpoint's limit, shared by every process using this breaker's name.
        self.limit = limit
        self._wire = policy.wire()
        if limit is not None:
            self._wire = replace(self._wire, limit=limit.wire())
        self._limited = limit is not None
        self._counts_tokens = limit is not None and limit.counts_tokens
        self._wait = 0.0 if limit is None else limit.wait
        # A rate refusal is exact: no permit exists for anyone before it ends, so
        # until then (local clock) this process refuses without asking.
        self._rate_hold = 0.0
        self._why: tuple[int, str | None] = (-2, None)
        self._view = self.store.view(self.name)
        self._clock = self.store.local_clock
        self._slow_ms = (
            None if policy.slow_call_seconds is None else policy.slow_call_seconds * 1000
        )
        if classify is not None and not callable(classify):
            raise PolicyError(
                f"classify must be a callable taking the exception and returning an Outcome "
                f"or None, got {classify!r}"
            )
        self._failures = policy.failure_exceptions
        self._ignored = policy.ignored_exceptions
        self._hooks: tuple[Classifier, ...] = tuple(
            hook for hook in (classify, policy.classify) if hook is not None
        )
        self._open_calls = threading.local()
        self._async_store = is_async_store(self.store)
        if health_check is not None and self._async_store:
            raise PolicyError(
                "health_check needs a blocking store (RedisStore): it runs in a thread; "
                "let the workers' breakers check health, an AsyncRedisStore shares their state"
            )
        self._longest_open_ms = int(policy.longest_open_seconds * 1000)
        self._health = health_checker(
            self.name,
            cast(Store, self.store),
            health_check,
            health_interval,
            self.health_passed,
            health_timeout,
        )
        if self._health is not None:
            self._health.on_result = self._health_checked

    def __repr__(self) -> str:
        limit = "" if self.limit is None else f", limit={self.limit!r}"
        return f"CircuitBreaker({self.name!r}, policy={self.policy!r}, store={self.store!r}{limit})"

    # -- guarding calls --------------------------------------------------------

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` through the breaker."""
        if self._async_store:
            self._require_sync("call")
        if self._view.closed and not self._limited:
            probe = None
        else:
            try:
                ticket = self.admit(tokens=self._estimate(args, kwargs))
            except CallRefused:
                if self.fallback is None:
                    raise
                return cast(R, self.fallback(*args, **kwargs))
            if ticket is not None:
                return self._call_ticketed(ticket, fn, args, kwargs)
            probe = None
        slow_ms, events = self._slow_ms, self.events
        timed = slow_ms is not None or bool(events)
        start = perf_counter() if timed else 0.0
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.record_exception(probe, exc, _ms_since(start) if timed else None)
            raise
        # record(), inlined: this is the path every healthy call takes.
        elapsed_ms = _ms_since(start) if timed else 0.0
        slow = slow_ms is not None and elapsed_ms > slow_ms
        how = HEALTHY if probe is None and not slow else CallResult(probe, Outcome.SUCCESS, slow)
        reply = self.store.record(self.name, self._wire, how)
        if reply.version > self._view.version or reply.transitions:
            self._learn(reply)
        if events:
            seconds = elapsed_ms / 1000
            events.emit(CallRecorded(self.name, Outcome.SUCCESS, seconds, slow, probe is not None))
        return result

    def _call_ticketed(
        self, ticket: Ticket, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> R:
        """A call that holds something to give back: a probe, a slot, reserved tokens."""
        tokens = self._token_cell()
        start = perf_counter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.record_exception(ticket, exc, _ms_since(start))
            raise
        finally:
            if tokens is not None:
                _reported_tokens.reset(tokens[0])
        elapsed_ms = _ms_since(start)
        self.record(ticket, Outcome.SUCCESS, elapsed_ms, tokens_used=self._tokens(tokens, result))
        return result

    def _token_cell(self) -> tuple[Any, list[int | None]] | None:
        """A fresh cell for report_tokens() during one call (None: no token budget)."""
        if not self._counts_tokens:
            return None
        cell: list[int | None] = [None]
        return _reported_tokens.set(cell), cell

    def _tokens(self, tokens: tuple[Any, list[int | None]] | None, result: Any) -> int | None:
        """What a call used of the token budget: reported, else read from its result."""
        if tokens is None:
            return None
        reported = tokens[1][0]
        if reported is not None:
            return reported
        return self.tokens_used(result)

    def tokens_used(self, result: Any) -> int | None:
        """The tokens ``result`` says its call used, by the limit's ``usage`` (None: unknown)."""
        usage = None if self.limit is None else self.limit.usage
        if usage is None:
            return None
        try:
            used = usage(result)
        except Exception:
            log.exception("breaker %r: the limit's usage() failed: the estimate stands", self.name)
            return None
        if used is None or (isinstance(used, int) and not isinstance(used, bool) and used >= 0):
            return used
        log.error(
            "breaker %r: the limit's usage() returned %r, not a whole number of tokens: "
            "the estimate stands",
            self.name,
            used,
        )
        return None

    def _estimate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """The tokens a call with these arguments reserves (0 without a token budget)."""
        if not self._counts_tokens:
            return 0
        assert self.limit is not None
        return self.limit.estimate_for(args, kwargs)

    def stream(
        self, fn: Callable[P, Iterable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Iterator[T]:
        """Iterate ``fn(*args, **kwargs)`` (a streamed answer) through the breaker.

        The call is admitted when the first item is asked for and recorded
        when the stream ends: a stream cut off midway (the iterator raised)
        is classified like any exception; one the consumer stops reading is
        a success (the endpoint was answering). An open circuit raises
        :class:`CircuitOpenError`, or yields from ``fallback(*args, **kwargs)``.
        Under a token budget the last item the limit's ``usage`` can read
        (an OpenAI stream's final chunk with ``usage``) settles the call.
        """
        if self._async_store:
            self._require_sync("call")
        try:
            ticket = self.admit(tokens=self._estimate(args, kwargs))
        except CallRefused:
            if self.fallback is None:
                raise
            yield from self.fallback(*args, **kwargs)
            return
        used: int | None = None
        start = perf_counter()
        try:
            for item in fn(*args, **kwargs):
                if self._counts_tokens:
                    used = self.tokens_used(item) or used
                yield item
        except GeneratorExit:
            self.record(ticket, Outcome.SUCCESS, _ms_since(start), tokens_used=used)
            raise
        except BaseException as exc:
            self.record_exception(ticket, exc, _ms_since(start))
            raise
        self.record(ticket, Outcome.SUCCESS, _ms_since(start), tokens_used=used)

    async def astream(
        self, fn: Callable[P, AsyncIterable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncIterator[T]:
        """:meth:`stream` for an async iterator (an ``async def`` generator: an LLM's answer
        streamed from FastAPI or ``openai.AsyncOpenAI``): the store awaited.

        A stream cut off midway is classified like any exception; one the
        consumer closes early (``aclose()``) is a success. The fallback may
        return an async or a plain iterable.
        """
        try:
            ticket = await self.aadmit(tokens=self._estimate(args, kwargs))
        except CallRefused:
            if self.fallback is None:
                raise
            answer = self.fallback(*args, **kwargs)
            if hasattr(answer, "__aiter__"):
                async for item in answer:
                    yield item
            else:
                for item in answer:
                    yield item
            return
        used: int | None = None
        start = perf_counter()
        try:
            async for item in fn(*args, **kwargs):
                if self._counts_tokens:
                    used = self.tokens_used(item) or used
                yield item
        except GeneratorExit:
            await self.arecord(ticket, Outcome.SUCCESS, _ms_since(start), tokens_used=used)
            raise
        except BaseException as exc:
            await self.arecord_exception(ticket, exc, _ms_since(start))
            raise
        await self.arecord(ticket, Outcome.SUCCESS, _ms_since(start), tokens_used=used)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (a plain, async, generator or async generator function) so each
        call is guarded.

        A generator function's stream is guarded as :meth:`stream` does, an
        async generator's as :meth:`astream` does: its outcome is recorded when
        the stream ends.
        """
        if inspect.iscoroutinefunction(fn):
            return cast(Callable[P, R], guard_async(self, fn))
        if inspect.isasyncgenfunction(fn):
            agen = cast(Callable[P, AsyncIterable[Any]], fn)

            @functools.wraps(fn)
            def guarded_astream(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[Any]:
                return self.astream(agen, *args, **kwargs)

            guarded_astream.breaker = self  # type: ignore[attr-defined]
            return cast(Callable[P, R], guarded_astream)
        if inspect.isgeneratorfunction(fn):
            generator = cast(Callable[P, Iterable[Any]], fn)

            @functools.wraps(fn)
            def guarded_stream(*args: P.args, **kwargs: P.kwargs) -> Iterator[Any]:
                return self.stream(generator, *args, **kwargs)

            guarded_stream.breaker = self  # type: ignore[attr-defined]
            return cast(Callable[P, R], guarded_stream)

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            return self.call(fn, *args, **kwargs)

        guarded.breaker = self  # type: ignore[attr-defined]
        return guarded

    def __enter__(self) -> CircuitBreaker:
        ticket = self.admit(tokens=self._estimate((), {}))
        stack = self._open_calls.__dict__.setdefault("stack", [])
        stack.append((ticket, perf_counter(), self._token_cell()))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ticket, start, tokens = self._open_calls.stack.pop()
        if tokens is not None:
            _reported_tokens.reset(tokens[0])
        elapsed_ms = (perf_counter() - start) * 1000
        if exc is None:
            self.record(ticket, Outcome.SUCCESS, elapsed_ms, tokens_used=self._tokens(tokens, None))
        else:
            self.record_exception(ticket, exc, elapsed_ms)

    # -- the two steps, for callers that cannot wrap the call (Celery tasks) -----

    def admit(self, *, tokens: int = 0, wait: float | None = None) -> Ticket | None:
        """Ask to make a call: returns its :class:`Ticket` (None for a plain call).

        Raises :class:`CircuitOpenError` when the circuit refuses the call and
        :class:`LimitExceeded` when the limit does, after waiting up to
        ``wait`` seconds (default the limit's ``wait``) for a slot or permit.
        ``tokens`` is what the call reserves of a token budget. Every admitted
        call must be followed by :meth:`record` or :meth:`record_exception`
        with the ticket returned here.
        """
        # Before the local view: on an async store, a blocking admit() is a
        # mistake even while this process knows the circuit is closed.
        self._require_sync("admit")
        try:
            if self._answered_locally():
                return None
            deadline = time.monotonic() + (self._wait if wait is None else wait)
            while True:
                call_id = new_probe_id()
                wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
                reply = self.store.admit(self.name, self._wire, call_id, tokens, wait_ms)
                try:
                    ticket = self._admission(reply, call_id, tokens)
                except LimitExceeded as exc:
                    pause = _jittered(exc.retry_after)
                    if time.monotonic() + pause > deadline:
                        raise
                    time.sleep(pause)
                    continue
                if reply.delay_ms:
                    time.sleep(reply.delay_ms / 1000)  # a permit reserved ahead of time
                return ticket
        except CallRefused as exc:
            self._rejected(exc)
            raise

    def record(
        self,
        probe: Ticket | str | None,
        outcome: Outcome,
        elapsed_ms: float | None = None,
        retry_after: float | None = None,
        tokens_used: int | None = None,
        *,
        failure: str = "",
    ) -> None:
        """Count an admitted call's outcome; ``probe`` is the ticket :meth:`admit` returned.

        ``elapsed_ms`` is how long the call took (None: not timed, never slow);
        ``tokens_used`` what it used of a token budget (None: the estimate stands);
        ``failure`` what a failure was, for operators (:meth:`record_exception` says it).
        """
        self._require_sync("record")
        result = self._call_result(probe, outcome, elapsed_ms, retry_after, tokens_used, failure)
        self._recorded(self.store.record(self.name, self._wire, result), result, elapsed_ms)

    def record_exception(
        self, probe: Ticket | str | None, exc: BaseException, elapsed_ms: float | None
    ) -> Outcome:
        """Count a call that raised ``exc``, classified by the policy; returns the outcome."""
        outcome = self.classify(exc)
        self.record(probe, outcome, elapsed_ms, retry_hint(exc), failure=_said(outcome, exc))
        return outcome

    def classify(self, exc: BaseException) -> Outcome:
        """Failure, overload, ignored (the caller's fault), or success (the endpoint answered).

        The breaker's ``classify``, then the policy's, then its
        ``ignored_exceptions``, the defaults and its ``failure_exceptions``.
        """
        return judge(exc, self._hooks, self._ignored, self._failures)

    def _answered_locally(self) -> bool:
        """True: admit without asking the store; False: ask it. Raises if known refused."""
        view = self._view
        if view.closed and not self._limited:
            return True
        now = self._clock()
        if now < view.reject_until:
            if view.mode == _DISABLED:
                return not self._limited
            state = "half_open" if view.half_open else "open"
            reason = "half-open, probes in progress" if view.half_open else "circuit is open"
            raise CircuitOpenError(self.name, view.reject_until - now, reason, state)
        if now < self._rate_hold and view.mode != _DISABLED:
            raise LimitExceeded(self.name, self._rate_hold - now, "rate limit reached", "rate")
        return False

    def _admission(self, reply: Reply, call_id: str, tokens: int) -> Ticket | None:
        """The store's answer to an admission: a Ticket (None: nothing to give back), or
        CircuitOpenError / LimitExceeded."""
        self._learn(reply)
        if reply.admitted:
            limit = self._wire.limit
            if limit is None or reply.mode == _DISABLED:
                return None if reply.probe_id is None else Ticket(reply.probe_id)
            slot = call_id if limit.counts_slots else None
            reserved = tokens if limit.token_ms else 0
            if reply.probe_id is None and slot is None and not reserved:
                return None
            return Ticket(reply.probe_id, slot, reserved)
        retry_after = reply.retry_after_ms / 1000
        if reply.refused_by:
            kind = REFUSED_BY[reply.refused_by]
            if reply.refused_by == RATE and reply.cacheable:
                self._rate_hold = self._clock() + retry_after
            raise LimitExceeded(self.name, retry_after, f"{kind} limit reached", kind)
        half_open = reply.state == HALF_OPEN
        if reply.cacheable and half_open:
            # Every probe slot is taken: wait locally, a close is news we will hear.
            self._view.hold_off(self._clock() + retry_after, half_open=True)
        reason = "half-open, probes in progress" if half_open else "circuit is open"
        if reply.mode == Mode.FORCED_OPEN:
            reason = "forced open by an operator"
        state = "half_open" if half_open else "open"
        raise CircuitOpenError(self.name, retry_after, reason, state)

    def _call_result(
        self,
        probe: Ticket | str | None,
        outcome: Outcome,
        elapsed_ms: float | None,
        retry_after: float | None,
        tokens_used: int | None = None,
        failure: str = "",
    ) -> CallResult:
        """How a call went: slow or not, the endpoint's Retry-After in ms (bounded), and
        what it gives back of its limit."""
        slow = self._slow_ms is not None and elapsed_ms is not None and elapsed_ms > self._slow_ms
        retry_after_ms = 0 if retry_after is None else max(0, round(retry_after * 1000))
        # An endpoint's word, bounded: an hour at most.
        retry_after_ms = min(retry_after_ms, _MAX_RETRY_AFTER_MS)
        if not isinstance(probe, Ticket):
            return CallResult(probe, outcome, slow, retry_after_ms, failure=failure)
        return CallResult(
            probe.probe_id,
            outcome,
            slow,
            retry_after_ms,
            slot=probe.slot,
            reserved=probe.tokens,
            used=-1 if tokens_used is None else tokens_used,
            latency_ms=-1.0 if elapsed_ms is None else elapsed_ms,
            failure=failure,
        )

    def _recorded(self, reply: Reply, result: CallResult, elapsed_ms: float | None) -> None:
        if reply.version > self._view.version or reply.transitions:
            self._learn(reply, result.failure)
        if self.events:
            seconds = None if elapsed_ms is None else elapsed_ms / 1000
            self.events.emit(
                CallRecorded(
                    self.name, result.outcome, seconds, result.slow, result.probe_id is not None
                )
            )

    def _rejected(self, exc: CallRefused) -> None:
        if self.events:
            kind = exc.kind if isinstance(exc, LimitExceeded) else "circuit"
            self.events.emit(CallRejected(self.name, exc.reason, exc.retry_after, kind))

    def _health_checked(self, name: str, healthy: bool, error: BaseException | None) -> None:
        if self.events:
            self.events.emit(HealthChecked(name, healthy, error))

    def _require_sync(self, what: str) -> None:
        if self._async_store:
            raise PolicyError(
                f"breaker {self.name!r} keeps its state in a {type(self.store).__name__}, "
                f"whose calls are awaited: use `await breaker.a{what}(...)`"
                + (" or `async with breaker:`" if what == "call" else "")
            )

    # -- state and operations ----------------------------------------------------

    @property
    def state(self) -> State:
        """The circuit's state now, as every process sharing it sees it."""
        status = self.status()
        return State.CLOSED if status is None else status.state

    def status(self) -> BreakerStatus | None:
        """Counters and state for operators; None before the first call."""
        self._require_sync("status")
        status: BreakerStatus | None = self.store.status(self.name, self._wire)
        return status

    def why_open(self) -> str | None:
        """The last failure the fleet counted ("ConnectionError: ..."), read from the store
        once per change of state this process hears of (one round trip per trip)."""
        version = self._view.version
        if self._why[0] != version:
            try:
                status = self.status() if not self._async_store else None
            except Exception:  # watching must never fail a request
                status = None
            # The read itself teaches the view the version it read: keyed by that.
            self._why = (self._view.version, None if status is None else status.last_failure)
        return self._why[1]

    @property
    def health(self) -> HealthChecker | None:
        """The health checker, if a ``health_check`` was given."""
        return self._health

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(StateChange)`` on every transition this process makes."""
        if not callable(listener):
            raise PolicyError(f"a listener must be callable, got {listener!r}")
        self.events.subscribe(only_state_changes(listener))

    def _learn(self, reply: Reply, failure: str = "") -> None:
        """Take a store's reply: this process's view, and the transitions it made (logged
        and emitted; a trip by the call just recorded says its ``failure``)."""
        if self._health is not None:
            self._health.ensure_running()  # again after a fork
        if reply.cacheable:
            if self._health is not None:
                self._health.observe(
                    reply.state, reply.remaining_ms, reply.mode, self.store.local_clock()
                )
            self._view.apply(
                reply.state,
                # Never trust a state hash longer than the policy allows (it
                # could be forged): past that, this process asks again.
                min(reply.remaining_ms, self._longest_open_ms),
                reply.mode,
                reply.version,
                self.store.local_clock(),
            )
        for from_code, to_code, reason in reply.transitions:
            event = StateChange(
                self.name,
                STATE_BY_CODE[from_code],
                STATE_BY_CODE[to_code],
                reason,
                reply.now_ms / 1000,
            )
            # Every transition, and why: a trip says the failure that caused it.
            said = f"{reason}; last failure: {failure}" if to_code == OPEN and failure else reason
            log.log(
                logging.WARNING if to_code == OPEN else logging.INFO,
                "breaker %r: %s -> %s (%s)",
                self.name,
                event.from_state,
                event.to_state,
                said,
            )
            if self.events:
                self.events.emit(event)

    # -- the operator's commands: each one atomic step of the store's machine ------
    #
    # ``by`` (who) and ``why`` go to the breaker's history with the command.

    def force_open(self, *, by: str = "", why: str = "") -> None:
        """Open the circuit until :meth:`force_close` or :meth:`reset`, everywhere."""
        self._control("force_open", by, why)

    def force_close(self, *, by: str = "", why: str = "") -> None:
        """Close the circuit now, everywhere; it may trip again."""
        self._control("force_close", by, why)

    def force_half_open(self, *, by: str = "", why: str = "") -> None:
        """Half-open now, everywhere: the next calls probe and decide (a test's, or an
        operator's "try it now")."""
        self._control("force_half_open", by, why)

    def reset(self, *, by: str = "", why: str = "") -> None:
        """Forget all state: closed, no counts, no backoff, not disabled (the history stays)."""
        self._control("reset", by, why)

    def disable(self, *, by: str = "", why: str = "") -> None:
        """Shadow mode: admit every call but keep counting, everywhere."""
        self._control("disable", by, why)

    def enable(self, *, by: str = "", why: str = "") -> None:
        """Leave shadow mode (or a forced open): the policy decides again."""
        self._control("enable", by, why)

    def health_passed(self) -> None:
        """A health check passed: an open circuit goes half-open now (probes decide the rest)."""
        self._control("healthy")

    def history(self, since: float = 0.0, count: int = 100) -> list[HistoryEntry]:
        """The newest ``count`` transitions and operators' commands since ``since``
        (epoch seconds), oldest first: kept by the scripts, at the store's time."""
        self._require_sync("history")
        entries: list[HistoryEntry] = self.store.history(self.name, since, count)
        return entries

    def _control(self, op: str, by: str = "", why: str = "") -> None:
        self._require_sync("control")
        self._learn(self.store.control(self.name, self._wire, op, by, why))

    async def aforce_open(self, *, by: str = "", why: str = "") -> None:
        """:meth:`force_open`, awaited."""
        await self._acontrol("force_open", by, why)

    async def aforce_close(self, *, by: str = "", why: str = "") -> None:
        """:meth:`force_close`, awaited."""
        await self._acontrol("force_close", by, why)

    async def aforce_half_open(self, *, by: str = "", why: str = "") -> None:
        """:meth:`force_half_open`, awaited."""
        await self._acontrol("force_half_open", by, why)

    async def areset(self, *, by: str = "", why: str = "") -> None:
        """:meth:`reset`, awaited."""
        await self._acontrol("reset", by, why)

    async def adisable(self, *, by: str = "", why: str = "") -> None:
        """:meth:`disable`, awaited."""
        await self._acontrol("disable", by, why)

    async def aenable(self, *, by: str = "", why: str = "") -> None:
        """:meth:`enable`, awaited."""
        await self._acontrol("enable", by, why)

    async def ahistory(self, since: float = 0.0, count: int = 100) -> list[HistoryEntry]:
        """:meth:`history`, awaited."""
        method = self.store.history
        if self._async_store:
            entries: list[HistoryEntry] = await method(self.name, since, count)
        else:
            entries = await asyncio.to_thread(method, self.name, since, count)
        return entries

    async def _acontrol(self, op: str, by: str = "", why: str = "") -> None:
        self._learn(await _store_call(self, "control", op, by, why))

    # -- the async forms: the same steps, only the store's round trips awaited ------

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """``await fn(*args, **kwargs)`` through the breaker."""
        try:
            ticket = await self.aadmit(tokens=self._estimate(args, kwargs))
        except CallRefused:
            if self.fallback is None:
                raise
            answer = self.fallback(*args, **kwargs)
            return await answer if inspect.isawaitable(answer) else answer  # type: ignore[no-any-return]
        tokens = self._token_cell()
        start = perf_counter()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            await self.arecord_exception(ticket, exc, _ms_since(start))
            raise
        finally:
            if tokens is not None:
                _reported_tokens.reset(tokens[0])
        used = self._tokens(tokens, result)
        await self.arecord(ticket, Outcome.SUCCESS, _ms_since(start), tokens_used=used)
        return result

    async def aadmit(self, *, tokens: int = 0, wait: float | None = None) -> Ticket | None:
        """:meth:`admit`, awaiting the store when it must be asked (and any wait)."""
        try:
            if self._answered_locally():
                return None
            deadline = time.monotonic() + (self._wait if wait is None else wait)
            while True:
                call_id = new_probe_id()
                wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
                reply: Reply = await _store_call(self, "admit", call_id, tokens, wait_ms)
                try:
                    ticket = self._admission(reply, call_id, tokens)
                except LimitExceeded as exc:
                    pause = _jittered(exc.retry_after)
                    if time.monotonic() + pause > deadline:
                        raise
                    await asyncio.sleep(pause)
                    continue
                if reply.delay_ms:
                    await asyncio.sleep(reply.delay_ms / 1000)
                return ticket
        except CallRefused as exc:
            self._rejected(exc)
            raise

    async def arecord(
        self,
        probe: Ticket | str | None,
        outcome: Outcome,
        elapsed_ms: float | None = None,
        retry_after: float | None = None,
        tokens_used: int | None = None,
        *,
        failure: str = "",
    ) -> None:
        """:meth:`record`, awaited."""
        result = self._call_result(probe, outcome, elapsed_ms, retry_after, tokens_used, failure)
        self._recorded(await _store_call(self, "record", result), result, elapsed_ms)

    async def arecord_exception(
        self, probe: Ticket | str | None, exc: BaseException, elapsed_ms: float | None
    ) -> Outcome:
        """:meth:`record_exception`, awaited."""
        outcome = self.classify(exc)
        await self.arecord(probe, outcome, elapsed_ms, retry_hint(exc), failure=_said(outcome, exc))
        return outcome

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
            return (State.HALF_OPEN if view.half_open else State.OPEN), view.reject_until - now
        if self._async_store:  # unreachable reads as closed: the workers decide meanwhile
            status = await self.store.status(self.name, self._wire, strict=False)
        else:
            status = await self.astatus()
        if status is None or status.mode is Mode.DISABLED:
            return State.CLOSED, 0.0
        return status.state, status.retry_after

    async def __aenter__(self) -> Self:
        ticket = await self.aadmit(tokens=self._estimate((), {}))
        tokens = self._token_cell()
        _open_calls.set((*_open_calls.get(), (self, ticket, perf_counter(), tokens)))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        calls = _open_calls.get()
        at = max(i for i, call in enumerate(calls) if call[0] is self)
        _, ticket, start, tokens = calls[at]
        _open_calls.set(calls[:at] + calls[at + 1 :])
        if tokens is not None:
            _reported_tokens.reset(tokens[0])
        elapsed_ms = (perf_counter() - start) * 1000
        if exc is None:
            used = self._tokens(tokens, None)
            await self.arecord(ticket, Outcome.SUCCESS, elapsed_ms, tokens_used=used)
        else:
            await self.arecord_exception(ticket, exc, elapsed_ms)


def _ms_since(start: float) -> float:
    return (perf_counter() - start) * 1000


def _said(outcome: Outcome, exc: BaseException) -> str:
    """What a failure was, for operators ("" for what is not one); an overload's too, kept
    only where it counts as a failure (no adaptive limit, or one at its minimum)."""
    return failure_text(exc) if outcome in (Outcome.FAILURE, Outcome.OVERLOAD) else ""


def _jittered(seconds: float) -> float:
    """A refused call's wait before asking again, spread so waiters do not ask at once."""
    return seconds * (1.0 + 0.5 * random.random())


async def _store_call(breaker: CircuitBreaker, op: str, *args: Any) -> Any:
    """The store's ``op`` for this breaker, without holding the event loop."""
    method = getattr(breaker.store, op)
    if breaker._async_store:
        return await method(breaker.name, breaker._wire, *args)
    if isinstance(breaker.store, MemoryStore):
        return method(breaker.name, breaker._wire, *args)  # no I/O: no thread needed
    return await asyncio.to_thread(method, breaker.name, breaker._wire, *args)


def guard_async(
    breaker: CircuitBreaker, fn: Callable[P, Awaitable[R]]
) -> Callable[P, Awaitable[R]]:
    """``fn``, an ``async def``, with each call guarded by ``breaker``."""

    @functools.wraps(fn)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        return await breaker.acall(fn, *args, **kwargs)

    guarded.breaker = breaker  # type: ignore[attr-defined]
    return guarded


def new_probe_id() -> str:
    """A random id for a call that may become a probe."""
    return os.urandom(8).hex()


def is_async_store(store: object) -> bool:
    """True for a store whose operations are coroutines (AsyncRedisStore)."""
    return inspect.iscoroutinefunction(getattr(store, "admit", None))
