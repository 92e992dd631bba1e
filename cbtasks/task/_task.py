"""CircuitBreakerTask: a Celery task base class that consults a breaker first.

    @app.task(base=CircuitBreakerTask, bind=True, breaker="model-a")
    def predict(self, features):
        return http_client(URL).predict({"features": features})

Before the task body runs, the breaker named ``breaker`` (shared by every
worker on every host through Redis) admits the call or rejects it. A rejected
request, or one whose call failed with an endpoint failure, is deferred:
re-published with the same task id and a countdown (``defer="countdown"``) or
parked in Redis until the circuit closes (``defer="park"``), without touching
the task's own retry budget. Past ``max_deferrals`` or ``defer_deadline`` it
gets its ``fallback``, or fails with :class:`~cbtasks.CircuitOpenError`.

Options are task attributes or decorator options, falling back to
``app.conf.cbtasks_<option>`` and then to their defaults, each declared once in
``_options.TaskOptions`` and resolved onto the task class when Celery binds it,
as Celery's own ``from_config`` options are. ``app.conf.cbtasks_redis_url``
names the Redis that holds breaker state, parked requests and completion marks
(default: the broker URL when the broker is Redis).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from time import perf_counter
from typing import Any

import celery
from celery import signals
from celery.exceptions import Ignore, Reject, Retry

from .. import fallbacks as fb
from .._breaker import CircuitBreaker, Ticket, _reported_tokens
from .._classify import retry_hint
from .._errors import CallRefused, CircuitOpenError, PolicyError
from .._events import (
    FallbackServed,
    RequestDeferred,
    RequestFailed,
    RequestWaited,
    instruments,
    store_error,
)
from .._state import Outcome
from ..stores import MemoryStore, RedisStore
from ..stores._connection import REDIS_TROUBLE, cause, describe_client
from ..stores._memory import process_store
from ..stores._parking import ParkingLot
from ._completion import CompletionGuard
from ._countdown import as_the_same_request, deferral_countdown
from ._headers import (
    CHECK_COMPLETION,
    DEADLINE,
    DEFERRALS,
    DEFERRED_AT,
    DEFERRED_BY,
    REASON,
    RECEIVED_AT,
    header,
    waited_since,
)
from ._memory import collect_now_and_then
from ._modes import DeferralMode, Refusal, mode_named
from ._options import (
    MEMORY_URL,
    TaskOptions,
    hide_redis_url_from_reports,
    lease_of,
    near_misses,
    redis_url,
    unknown_settings,
    validate_options,
    validate_task,
)
from ._parked import expires_at, parked_message, publish_parked, revoke_expired
from ._pause import PauseQueues, check_pause_queues, consume_pause_queues, pause_queues
from ._pools import fit_broker_connections
from ._releaser import Releaser
from ._reports import flower_events, report_deferred
from ._visibility import safe_hold
from ._waits import waits_record

__all__ = ["CircuitBreakerTask"]

log = logging.getLogger("cbtasks.task")


class CircuitBreakerTask(TaskOptions, celery.Task):  # type: ignore[misc]
    """A task whose calls to a model endpoint go through a shared circuit breaker.

    Its options (``breaker``, ``on_open``, ``defer``, ``fallback``, ``limit``...) are
    declared once, in :class:`~cbtasks.task._options.TaskOptions`, each with its
    default, its check and its ``app.conf`` setting; docs/tasks.md's table is made
    from them.
    """

    @classmethod
    def on_bound(cls, app: celery.Celery) -> None:
        """Celery binds a task class to ``app``: wire cbtasks into that app's workers (once
        per app). Importing cbtasks wires nothing: this is where the framework hands us
        its object."""
        super().on_bound(app)
        cls.resolve_options(app)
        wire(app)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Celery builds a subclass per decorated function, with the decorator's
        # options as class attributes: bad options fail here, at registration.
        super().__init_subclass__(**kwargs)
        validate_options(cls)

    # -- what each process makes once: breaker, store, parking lot, guard, releaser --
    #
    # Celery's prefork pool forks after the app is loaded, so nothing made in the
    # parent is used in a child: each part is made once per process id. Kept on the
    # task's own class (each app's task is a class of its own): a test suite's second
    # app with a task of the same name gets a breaker with its own options.

    @property
    def cbtasks_breaker_name(self) -> str:
        """The name of the task's circuit (``breaker``, else the task's name)."""
        return self.breaker

    @property
    def cbtasks_breaker(self) -> CircuitBreaker:
        """This process's breaker object for the task's circuit."""
        # Keyed by where its state lives: a test that moves the app to memory:// (the
        # cbtasks fixture) gets a breaker of that store, not one made before.
        where = redis_url(self.app)
        return self._cached(f"breaker:{where}", self._make_breaker)  # type: ignore[no-any-return]

    @property
    def cbtasks_store(self) -> RedisStore:
        url = redis_url(self.app)
        if url == MEMORY_URL:
            # Tests and one process: this process's one MemoryStore, whose client
            # keeps the completion marks and a cache's answers.
            return process_store()  # type: ignore[return-value]
        prefix = self.cbtasks_prefix
        on_error, timeout = self.on_error, float(self.redis_timeout)
        key = f"store:{url}:{prefix}:{on_error}:{timeout}"
        return self._cached(key, lambda: _store(url, prefix, on_error, timeout))  # type: ignore[no-any-return]

    @property
    def cbtasks_redis(self) -> Any:
        return self.cbtasks_store.client

    @property
    def cbtasks_prefix(self) -> str:
        return self.prefix

    @property
    def cbtasks_parking(self) -> ParkingLot:
        return self._cached(  # type: ignore[no-any-return]
            "parking",
            lambda: ParkingLot(self.cbtasks_redis, self.cbtasks_prefix, self.cbtasks_breaker.name),
        )

    @property
    def cbtasks_completions(self) -> CompletionGuard:
        return self._cached(  # type: ignore[no-any-return]
            f"completions:{redis_url(self.app)}",
            lambda: CompletionGuard(
                self.cbtasks_redis,
                self.cbtasks_prefix,
                on_error=store_error,
                backend=self._result_backend(),
            ),
        )

    def _make_breaker(self) -> CircuitBreaker:
        self.cbtasks_check()  # a setting that cannot work: said here, not misused
        limit = self.limit
        lease = lease_of(self)
        if limit is not None and limit.lease is None and lease is not None:
            limit = dataclasses.replace(limit, lease=lease)
        breaker = CircuitBreaker(
            self.cbtasks_breaker_name,
            policy=self.breaker_policy,
            store=self.cbtasks_store,
            health_check=self.health_check,
            health_interval=float(self.health_interval),
            health_timeout=float(self.health_timeout),
            classify=self.classify,
            limit=limit,
        )
        # What the breaker and the task do reaches the metrics, Flower and the
        # waits record through the breaker's one stream of events.
        for instrument in instruments():
            breaker.events.subscribe(instrument.observe)
        for subscriber in (flower_events, waits_record):
            breaker.events.subscribe(subscriber)
        return breaker

    def _cached(self, what: str, make: Any) -> Any:
        made: dict[tuple[int, str], Any] | None = vars(type(self)).get(_MADE)
        if made is None:
            made = {}
            setattr(type(self), _MADE, made)
        key = (os.getpid(), what)
        value = made.get(key)
        if value is None:
            value = made[key] = make()
        return value

    def cbtasks_releaser(self) -> Releaser:
        """This process's releaser of the breaker's parked requests, started if need be."""
        store = self.cbtasks_store
        key = f"{describe_client(store.client)}|{store.prefix}|{self.cbtasks_breaker.name}"

        def make() -> Releaser:
            return Releaser(
                self.cbtasks_parking,
                functools.partial(publish_parked, self.app, self.cbtasks_breaker.name),
                expire=functools.partial(revoke_expired, self.app),
                producer=self.app.producer_or_acquire,
                rate=float(self.release_rate),
                max_rate=float(self.max_release_rate),
            )

        return Releaser.ensure(key, make, store.add_news_hook)

    @property
    def cbtasks_deferral(self) -> DeferralMode:
        """The task's deferral mode (``defer``): countdown, park or pause."""
        return mode_named(self.defer)

    def _deferral_mode(self) -> str:
        """How a request in hand is deferred: countdown or park (pause: its in-hand choice)."""
        return self.cbtasks_deferral.in_hand(self).name

    @property
    def _in_memory(self) -> bool:
        """Breaker state in this process (``memory://``): no parking, no pause, no releaser."""
        return isinstance(self.cbtasks_store, MemoryStore)

    def _limit_wait(self, breaker: CircuitBreaker) -> float:
        """How long a refused request waits for its slot in this process before deferral."""
        wait = self.limit_wait
        if wait is not None:
            return float(wait)
        default = self.cbtasks_deferral.limit_wait
        return max(breaker.limit.wait if breaker.limit is not None else 0.0, default)

    # -- the run -----------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager:
            return self._call_in_place(args, kwargs)
        done = self._completion(request.id) if self._may_have_run(request) else None
        if done is not None:
            log.info(
                "task %s[%s] completed before: not calling the endpoint again",
                self.name,
                request.id,
            )
            return done[0]
        guard = self.cbtasks_breaker
        # Deferral happens after the except blocks, never inside one: an
        # exception kept alive there (as a raised Ignore's __context__) holds
        # its traceback's frames in reference cycles until a full garbage
        # collection, which is how plain retries bloat workers in an outage.
        rejection: CallRefused | None = None
        try:
            if guard.limit is None:
                probe = guard.admit()
            else:
                tokens = guard.limit.estimate_for(args, kwargs)
                probe = guard.admit(tokens=tokens, wait=self._limit_wait(guard))
        except CallRefused as exc:
            rejection = exc.with_traceback(None)
        if rejection is not None:
            return self._rejected(rejection, args, kwargs)
        start = perf_counter()
        failure: CircuitOpenError | None = None
        counted = (
            _reported_tokens.set([None]) if isinstance(probe, Ticket) and probe.tokens else None
        )
        try:
            result = self.run(*args, **kwargs)
        except (Ignore, Reject):
            guard.record(probe, Outcome.IGNORED, _ms_since(start))
            self._ran_at_last(guard)
            raise
        except Retry as exc:
            # The task's own retry: its cause counts, its budget is its own.
            retried_for = exc.exc if isinstance(exc.exc, BaseException) else None
            if retried_for is None:
                guard.record(probe, Outcome.IGNORED, _ms_since(start))
            else:
                guard.record_exception(probe, retried_for, _ms_since(start))
            self._ran_at_last(guard)
            raise
        except Exception as exc:
            outcome = guard.record_exception(probe, exc, _ms_since(start))
            # An endpoint failure, or the endpoint busy, is handled as a rejection
            # would be (deferred, or answered by the fallback); with
            # on_open="fail" it is raised.
            endpoint = outcome is Outcome.FAILURE or outcome is Outcome.OVERLOAD
            if not endpoint or self.on_open == "fail":
                self._ran_at_last(guard)
                raise
            # Only plain values leave this block (see above).
            retry_after = retry_hint(exc) or 0.0
            said = "endpoint busy" if outcome is Outcome.OVERLOAD else "call failed"
            failure = CircuitOpenError(guard.name, retry_after, f"{said}: {exc}")
        finally:
            used = None if counted is None else counted.var.get()
            if counted is not None:
                _reported_tokens.reset(counted)
        if failure is not None:
            return self._rejected(failure, args, kwargs)
        reported = used[0] if used else None
        tokens_used = reported if reported is not None else self._tokens_of(guard, probe, result)
        guard.record(probe, Outcome.SUCCESS, _ms_since(start), tokens_used=tokens_used)
        self._ran_at_last(guard)
        self._complete(request.id, result)
        self._remember(args, kwargs, result)
        return result

    def _remember(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
        """A good result to the fallback's ``remember`` hook (a cache keeps it)."""
        try:
            fb.remember(self.fallback, self, args, kwargs, result)
        except REDIS_TROUBLE as exc:
            log.warning("cannot cache the result of %s (%s)", self.name, cause(exc))

    def _ran_at_last(self, guard: CircuitBreaker) -> None:
        """A deferred request's run that is not deferred again: how long it waited, once,
        tagged with how it last waited (countdown or park, as RequestDeferred said)."""
        waited = waited_since(self.request)
        if waited is not None:
            mode = str(header(self.request, DEFERRED_BY) or "countdown")
            guard.events.emit(RequestWaited(guard.name, mode, waited, self))

    @staticmethod
    def _tokens_of(guard: CircuitBreaker, probe: Any, result: Any) -> int | None:
        """What a call used of its token budget, read from its result (None: unknown)."""
        if not isinstance(probe, Ticket) or not probe.tokens:
            return None
        return guard.tokens_used(result)

    def _call_in_place(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Called directly or eagerly: no queue to defer to, so fall back or raise."""
        try:
            result = self.cbtasks_breaker.call(super().__call__, *args, **kwargs)
        except CallRefused as exc:
            if self.fallback is None:
                raise
            return self._answer_with_fallback(exc, args, kwargs)
        self._remember(args, kwargs, result)  # an eager test's cache fills as a worker's does
        return result

    # -- rejection -------------------------------------------------------------------

    def _rejected(self, exc: CallRefused, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        on_open = self.on_open
        if on_open == "fallback" and self.fallback is not None:
            return self._answer_with_fallback(exc, args, kwargs)
        if on_open == "fail":
            self._emit(RequestFailed(exc.name, exc, self))
            raise exc
        request = self.request
        deferrals = int(header(request, DEFERRALS) or 0)
        deadline = float(header(request, DEADLINE) or time.time() + self.defer_deadline)
        if deferrals >= self.max_deferrals or time.time() >= deadline:
            why = "deadline passed" if time.time() >= deadline else f"{deferrals} deferrals"
            exhausted = exc.saying(f"{exc.reason}; gave up: {why}")
            if self.fallback is not None:
                return self._answer_with_fallback(exhausted, args, kwargs)
            self._emit(RequestFailed(exc.name, exhausted, self))
            raise exhausted
        if isinstance(exc, CircuitOpenError) and not exc.reason.startswith(_OWN_FAILURE):
            # Say why the circuit refused: the failure that opened it (Flower's reason,
            # the backend's info, the log), read once per trip.
            last = self.cbtasks_breaker.why_open()
            if last:
                exc = exc.saying(f"{exc.reason}; last failure: {last}")
        deferred_at = header(request, DEFERRED_AT) or time.time()
        headers = {DEFERRALS: deferrals + 1, DEADLINE: deadline, DEFERRED_AT: deferred_at}
        headers[REASON] = exc.reason[:200]
        collect_now_and_then(int(self.gc_every))
        refusal = Refusal(exc, args, kwargs, headers, deferrals)
        used = self.cbtasks_deferral.defer(self, refusal)
        if self.report_state and not self.ignore_result:
            report_deferred(self, exc, used, deferrals + 1)
        raise Ignore()

    def _answer_with_fallback(
        self, exc: CallRefused, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        fallback = self.fallback
        assert fallback is not None
        try:
            kind, value = fb.answer(fallback, self, args, kwargs)
        except fb.NoFallback as miss:
            failed = exc.saying(f"{exc.reason}; {miss}")
            self._emit(RequestFailed(exc.name, failed, self))
            raise failed from exc
        self._emit(FallbackServed(exc.name, kind, exc, self))
        return fb.mark(kind, value, exc.reason)

    # -- the deferral modes' mechanics (``_modes`` decides which) -----------------------

    def _defer_by_countdown(self, refusal: Refusal) -> None:
        """Re-publish the request, same id, retries untouched, due when the circuit or
        the limit may let it through (plus jitter)."""
        exc, request = refusal.error, self.request
        refusal.headers[DEFERRED_BY] = "countdown"
        wait = deferral_countdown(self.app, exc, float(self.defer_jitter))
        with as_the_same_request():
            self.signature_from_request(
                request,
                refusal.args,
                refusal.kwargs,
                countdown=wait,
                retries=request.retries,
                headers=refusal.headers,
            ).apply_async()
        deferral = refusal.deferrals + 1
        self._emit(RequestDeferred(exc.name, "countdown", exc, deferral, wait, self))
        log.info(
            "task %s[%s] deferred: %s (breaker %r), back in %.1f s by countdown "
            "(deferral %d, its retries untouched)",
            self.name,
            request.id,
            exc.reason,
            exc.name,
            wait,
            deferral,
        )

    def _defer_by_parking(self, refusal: Refusal) -> bool:
        """Park the request until the circuit closes; False if it could not be parked."""
        exc = refusal.error
        refusal.headers[DEFERRED_BY] = "park"
        if not self._parked(refusal.args, refusal.kwargs, refusal.headers):
            return False
        deferral = refusal.deferrals + 1
        self._emit(RequestDeferred(exc.name, "park", exc, deferral, None, self))
        log.info(
            "task %s[%s] deferred: %s (breaker %r), parked until the circuit closes (deferral %d)",
            self.name,
            self.request.id,
            exc.reason,
            exc.name,
            deferral,
        )
        return True

    # -- parking -------------------------------------------------------------------

    def _parked(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], headers: dict[str, Any]
    ) -> bool:
        """Park the request; False if Redis cannot take it now (then: a countdown)."""
        if self._in_memory:
            return False  # memory:// keeps no parking lot: a countdown (said at start)
        try:
            self._park(args, kwargs, headers)
        except REDIS_TROUBLE as exc:
            log.warning(
                "cannot park %s[%s] (%s): deferring it by countdown",
                self.name,
                self.request.id,
                cause(exc),
            )
            return False
        return True

    def _park(self, args: tuple[Any, ...], kwargs: dict[str, Any], headers: dict[str, Any]) -> None:
        message = parked_message(self, args, kwargs, headers)
        self.cbtasks_parking.park(self.request.id, message, expires_at=expires_at(message))

    # -- the completion guard ---------------------------------------------------------

    def _may_have_run(self, request: Any) -> bool:
        """Whether this message may be a request that completed already: worth a look.

        A message the broker redelivers (Redis restoring an unacknowledged one,
        RabbitMQ after a lost connection) may have run; so may a deferred one
        (a parked request released twice when its release's ack was lost), and
        one this worker held past half the visibility timeout: the broker may
        have delivered it again meanwhile, and that copy, flagged, may have
        run already while this one, not flagged, waited. A fresh message has
        not: the healthy path reads nothing. ``completion_check="always"``
        looks at every message.
        """
        if self.completion_check == "always":
            return True
        delivery = getattr(request, "delivery_info", None) or {}
        received_at = getattr(request, RECEIVED_AT, None)
        return (
            bool(delivery.get("redelivered"))
            or header(request, DEFERRALS) is not None
            or bool(header(request, CHECK_COMPLETION))
            # No stamp: not received by a worker we know of; look.
            or not isinstance(received_at, float)
            or time.monotonic() - received_at > safe_hold(self.app)
        )

    def _result_backend(self) -> Any:
        """The backend that keeps this task's results, if any (the completion guard reads it)."""
        backend = self.backend
        if self.ignore_result or backend is None or type(backend).__name__ == "DisabledBackend":
            return None
        return backend

    def _completion(self, task_id: str) -> tuple[Any] | None:
        done: tuple[Any] | None = self.cbtasks_completions.result_of(task_id)
        return done

    def _complete(self, task_id: str, result: Any) -> None:
        self.cbtasks_completions.mark(task_id, result, self.completion_ttl)

    def _emit(self, event: RequestDeferred | FallbackServed | RequestFailed) -> None:
        """What the task did with a refused request: to the breaker's events."""
        self.cbtasks_breaker.events.emit(event)


def _check_options(sender: Any = None, **_: Any) -> None:
    """Every option of every CircuitBreakerTask, app.conf included, before the worker starts."""
    app = getattr(sender, "app", None) or celery.current_app
    for said in unknown_settings(app):
        log.warning("cbtasks: %s", said)
    fitted = fit_broker_connections(app, sender)
    if fitted is not None:
        # Logging is not set up yet at worker_init: a warning shows on stderr now,
        # a note in the worker's log once it is ready.
        level, said = fitted
        if level >= logging.WARNING:
            log.warning("cbtasks: %s", said)
        else:
            _notes_at_ready.setdefault(id(app), []).append(said)
    try:
        for task in list(app.tasks.values()):
            if isinstance(task, CircuitBreakerTask):
                validate_task(task)
                for said in near_misses(task):
                    log.warning("cbtasks: %s", said)
        if redis_url(app) == MEMORY_URL:
            log.warning(
                "cbtasks: breaker state is in each process (memory://): parked and paused "
                "requests are deferred by countdown instead; for a fleet set cbtasks_redis_url"
            )
            return
        if pause_queues(app):
            check_pause_queues(app)
            consume_pause_queues(app)
            # Before the consumer is built (worker_init comes first): its bootstep.
            app.steps["consumer"].add(PauseQueues)
    except PolicyError as exc:
        log.critical("cbtasks: %s", exc)
        # Celery logs and swallows a receiver's Exception: stop the worker.
        raise SystemExit(f"cbtasks: {exc}") from None


#: Where a task class keeps what its process made (breaker, store, lot, guard).
_MADE = "_cbtasks_made"

#: What a worker's start did for its app, logged once the worker is ready (by app id).
_notes_at_ready: dict[int, list[str]] = {}


def _start_releasers(app: Any) -> None:
    """The worker's main process releases parked requests: one releaser per breaker and worker.

    Not the pool processes: releasing needs no task slot, and one releaser
    per worker keeps an idle fleet's Redis traffic to one re-check per worker.
    """
    for task in list(app.tasks.values()):
        if (
            isinstance(task, CircuitBreakerTask)
            and task.cbtasks_deferral.in_hand(task).parks
            and not task._in_memory
        ):
            task.cbtasks_releaser()


def _stop_releasers(**_: Any) -> None:
    """A warm shutdown: release nothing more to a worker that is going away (what is
    handed out but not yet published stays parked; its lease brings it back)."""
    Releaser.stop_all()


def _stamp_receipt(request: Any = None, **_: Any) -> None:
    """When the worker received the message: the completion guard reads how long it was held.

    Received in the worker's main process, run in a pool process of the same
    host: the monotonic clock is the same. Set on every receipt, so a value a
    sender put in the message is never believed.
    """
    if request is not None and isinstance(getattr(request, "task", None), CircuitBreakerTask):
        request.request_dict[RECEIVED_AT] = time.monotonic()


#: The start of the reason a task gives a failed call it defers (its own failure, not
#: the circuit's: nothing to add).
_OWN_FAILURE = ("call failed", "endpoint busy")


# The apps wired (by id: an app lives as long as its process) and the process-wide
# receivers connected once.
_wired: set[int] = set()
_wired_lock = threading.Lock()


def wire(app: celery.Celery) -> None:
    """Connect what ``app``'s workers need, once: the options checked and the pause
    bootstep added at worker_init, parked requests released once ready, releasers
    stopped at a warm shutdown, receipts stamped; the Redis URL masked in reports."""
    with _wired_lock:
        if id(app) in _wired:
            return
        first = not _wired
        _wired.add(id(app))
    hide_redis_url_from_reports()

    def check(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            _check_options(sender=sender)

    def release(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            for said in _notes_at_ready.pop(id(app), []):
                log.info("cbtasks: %s", said)
            _start_releasers(app)

    # Receivers held strongly (they are closures); each answers for its own app only.
    signals.worker_init.connect(check, weak=False)
    signals.worker_ready.connect(release, weak=False)
    if first:  # process-wide: any app's worker stops this process's releasers
        signals.worker_shutting_down.connect(_stop_releasers, weak=False)
        signals.task_received.connect(_stamp_receipt, weak=False)


def _ms_since(start: float) -> float:
    return (perf_counter() - start) * 1000


def _store(url: str, prefix: str, on_error: str, timeout: float) -> RedisStore:
    store = RedisStore(url, prefix=prefix, on_error=on_error, timeout=timeout)
    store.on_store_error = store_error
    return store
