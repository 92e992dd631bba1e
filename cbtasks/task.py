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
``app.conf.cbtasks_<option>`` and then to the defaults below, as Celery's own
task options do. ``app.conf.cbtasks_redis_url`` names the Redis that holds
breaker state, parked requests and completion marks (default: the broker URL
when the broker is Redis).
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import random
import threading
import time
from time import perf_counter
from typing import Any, ClassVar

import celery
import redis
from celery import signals
from celery.exceptions import Ignore, Reject, Retry

from . import fallbacks as fb
from ._breaker import CircuitBreaker
from ._errors import CircuitOpenError, PolicyError
from ._policy import BreakerPolicy
from ._state import Outcome
from .metrics import metrics
from .stores import RedisStore
from .stores._parking import ParkingLot

__all__ = ["CircuitBreakerTask"]

log = logging.getLogger("cbtasks.task")

ON_OPEN = ("defer", "fallback", "fail")
DEFER = ("countdown", "park")
DEFAULTS: dict[str, Any] = {
    "on_open": "defer",
    "defer": "countdown",
    "max_deferrals": 1000,
    "defer_deadline": 24 * 3600.0,
    "defer_jitter": 1.0,
    "release_rate": 20.0,
    "completion_ttl": 24 * 3600.0,
    "prefix": "cbtasks",
    "on_error": "local",
    "gc_every": 25,
}
# Headers that travel with a deferred request.
DEFERRALS, DEADLINE = "cbtasks_deferrals", "cbtasks_deadline"
# A countdown message waits in worker memory, unacknowledged: it must be
# re-published well before the broker's visibility timeout redelivers it.
_VISIBILITY_SHARE = 0.5
# Redis unreachable: what the breaker store's on_error handles for the breaker,
# and what the completion guard, cache and parking lot must survive.
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)


class CircuitBreakerTask(celery.Task):  # type: ignore[misc]
    """A task whose calls to a model endpoint go through a shared circuit breaker."""

    #: The breaker's name; tasks sharing it share one circuit. Default: the task's name.
    breaker: str | None = None
    #: A BreakerPolicy; default ``app.conf.cbtasks_policy`` (a policy or a dict of its fields).
    breaker_policy: BreakerPolicy | None = None
    #: What a rejected request does: "defer" (default), "fallback" or "fail".
    on_open: str | None = None
    #: How it is deferred: "countdown" (default) or "park".
    defer: str | None = None
    #: A fallback from cbtasks.fallbacks, or a callable taking the task's arguments.
    fallback: Any = None
    #: Deferrals allowed before the request gets its fallback or fails.
    max_deferrals: int | None = None
    #: Seconds after its first deferral that a request stops being deferred.
    defer_deadline: float | None = None
    #: Seconds of random spread added to each countdown.
    defer_jitter: float | None = None
    #: Parked requests re-published per second once the circuit closes.
    release_rate: float | None = None
    #: Seconds a completed task id is remembered (no second call if redelivered).
    completion_ttl: float | None = None
    #: A full garbage collection every this many deferrals per process (0: never).
    gc_every: int | None = None

    _per_process: ClassVar[dict[tuple[int, str], Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Celery builds a subclass per decorated function, with the decorator's
        # options as class attributes: bad options fail here, at registration.
        super().__init_subclass__(**kwargs)
        _validate_options(cls, getattr(cls, "name", None) or cls.__name__)

    # -- the run -----------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager:
            return self._call_in_place(args, kwargs)
        done = self._completion(request.id)
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
        rejection: CircuitOpenError | None = None
        try:
            probe = guard.admit()
        except CircuitOpenError as exc:
            rejection = exc.with_traceback(None)
        if rejection is not None:
            metrics().call(guard.name, "rejected")
            return self._rejected(rejection, args, kwargs)
        start = perf_counter()
        failure: CircuitOpenError | None = None
        try:
            result = self.run(*args, **kwargs)
        except (Ignore, Reject):
            guard.record(probe, Outcome.IGNORED)
            metrics().call(guard.name, "ignored")
            raise
        except Retry as exc:
            # The task's own retry: its cause counts, its budget is its own.
            cause = exc.exc if isinstance(exc.exc, BaseException) else None
            if cause is None:
                guard.record(probe, Outcome.IGNORED)
            else:
                guard.record_exception(probe, cause, _ms_since(start))
            raise
        except Exception as exc:
            guard.record_exception(probe, exc, _ms_since(start))
            outcome = guard.classify(exc)
            metrics().call(guard.name, outcome.name.lower())
            # An endpoint failure is handled as a rejection would be (deferred,
            # or answered by the fallback); with on_open="fail" it is raised.
            if outcome is not Outcome.FAILURE or self._option("on_open") == "fail":
                raise
            # Only plain values leave this block (see above).
            retry_after = float(getattr(exc, "retry_after", None) or 0.0)
            failure = CircuitOpenError(guard.name, retry_after, f"call failed: {exc}")
        if failure is not None:
            return self._rejected(failure, args, kwargs)
        elapsed_ms = _ms_since(start)
        guard.record(probe, Outcome.SUCCESS, elapsed_ms)
        slow_seconds = guard.policy.slow_call_seconds
        slow = slow_seconds is not None and elapsed_ms > slow_seconds * 1000
        metrics().call(guard.name, "slow" if slow else "success")
        if probe is not None:
            metrics().call(guard.name, "probe")
        self._complete(request.id, result)
        fallback = self._fallback
        if isinstance(fallback, fb.CachedResult):
            try:
                fallback.remember(self, args, kwargs, result)
            except _REDIS_DOWN as exc:
                log.warning("cannot cache the result of %s (%s)", self.name, exc)
        return result

    def _call_in_place(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Called directly or eagerly: no queue to defer to, so fall back or raise."""
        try:
            return self.cbtasks_breaker.call(super().__call__, *args, **kwargs)
        except CircuitOpenError as exc:
            if self._fallback is None:
                raise
            return self._answer_with_fallback(exc, args, kwargs)

    # -- rejection -------------------------------------------------------------------

    def _rejected(
        self, exc: CircuitOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        on_open = self._option("on_open")
        if on_open == "fallback" and self._fallback is not None:
            return self._answer_with_fallback(exc, args, kwargs)
        if on_open == "fail":
            self._event("task-circuit_open", exc, action="failed")
            raise exc
        request = self.request
        deferrals = int(_header(request, DEFERRALS) or 0)
        deadline = float(_header(request, DEADLINE) or time.time() + self._option("defer_deadline"))
        if deferrals >= self._option("max_deferrals") or time.time() >= deadline:
            why = "deadline passed" if time.time() >= deadline else f"{deferrals} deferrals"
            exhausted = CircuitOpenError(exc.name, exc.retry_after, f"{exc.reason}; gave up: {why}")
            if self._fallback is not None:
                return self._answer_with_fallback(exhausted, args, kwargs)
            self._event("task-circuit_open", exhausted, action="failed")
            raise exhausted
        headers = {DEFERRALS: deferrals + 1, DEADLINE: deadline}
        _collect_now_and_then(int(self._option("gc_every")))
        mode = self._option("defer")
        metrics().deferral(exc.name, mode)
        if mode == "park" and self._parked(args, kwargs, headers):
            self._event("task-circuit_open", exc, action="parked", deferrals=deferrals + 1)
        else:
            countdown = self._countdown(exc.retry_after)
            self.signature_from_request(
                request, args, kwargs, countdown=countdown, retries=request.retries, headers=headers
            ).apply_async()
            self._event("task-circuit_open", exc, action="deferred", countdown=countdown)
        raise Ignore()

    def _countdown(self, retry_after: float) -> float:
        """Until the next probe window, spread by jitter, capped below the visibility timeout."""
        options = self.app.conf.broker_transport_options or {}
        cap = float(options.get("visibility_timeout", 3600)) * _VISIBILITY_SHARE
        return min(max(retry_after, 0.05) + random.uniform(0, self._option("defer_jitter")), cap)

    def _answer_with_fallback(
        self, exc: CircuitOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        fallback = self._fallback
        assert fallback is not None
        try:
            value = fallback(self, args, kwargs)
        except fb.NoFallback as miss:
            self._event("task-circuit_open", exc, action="failed")
            raise CircuitOpenError(exc.name, exc.retry_after, f"{exc.reason}; {miss}") from exc
        self._event("task-circuit_fallback", exc, kind=fallback.kind)
        metrics().fallback(exc.name, fallback.kind)
        return fb.mark(fallback.kind, value, exc.reason)

    # -- parking -------------------------------------------------------------------

    def _parked(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], headers: dict[str, Any]
    ) -> bool:
        """Park the request; False if Redis cannot take it now (then: a countdown)."""
        try:
            self._park(args, kwargs, headers)
        except _REDIS_DOWN as exc:
            log.warning(
                "cannot park %s[%s] (%s): deferring it by countdown",
                self.name,
                self.request.id,
                exc,
            )
            return False
        return True

    def _park(self, args: tuple[Any, ...], kwargs: dict[str, Any], headers: dict[str, Any]) -> None:
        request = self.request
        options = {
            key: value
            for key, value in request.as_execution_options().items()
            if value is not None and key not in ("headers", "retries")
        }
        delivery = request.delivery_info or {}
        message = {
            "task": self.name,
            "args": list(args),
            "kwargs": kwargs,
            "retries": request.retries,
            "headers": headers,
            "queue": delivery.get("routing_key") or None,
            "options": options,
        }
        self.cbtasks_parking.park(request.id, message)
        _Releaser.ensure(self)

    def release_parked(self) -> int:
        """Re-publish parked requests that are due now; returns how many."""
        rate = float(self._option("release_rate"))
        lot = self.cbtasks_parking
        released = lot.release(rate=rate, burst=max(1, int(rate)), lease_seconds=30.0)
        done = []
        for request_id, message in released:
            task = self.app.tasks[message["task"]]
            task.apply_async(
                message["args"],
                message["kwargs"],
                retries=message["retries"],
                headers=message["headers"],
                queue=message["queue"],
                **message["options"],
            )
            done.append(request_id)
        lot.ack(done)
        return len(done)

    # -- the completion guard ---------------------------------------------------------

    # While Redis is down the guard cannot be read or written: the task goes on
    # without it (a redelivery then may call the endpoint again), as failing
    # every task during a Redis outage would be worse.

    def _completion(self, task_id: str) -> tuple[Any] | None:
        try:
            raw = self.cbtasks_redis.get(f"{self.cbtasks_prefix}:done:{task_id}")
        except _REDIS_DOWN:
            return None
        return None if raw is None else (json.loads(raw),)

    def _complete(self, task_id: str, result: Any) -> None:
        try:
            encoded = json.dumps(result)
        except (TypeError, ValueError):
            encoded = "null"  # the mark is what matters; Celery reports the error itself
        ttl_ms = int(self._option("completion_ttl") * 1000)
        try:
            self.cbtasks_redis.set(f"{self.cbtasks_prefix}:done:{task_id}", encoded, px=ttl_ms)
        except _REDIS_DOWN as exc:
            log.warning("cannot mark %s[%s] completed (%s)", self.name, task_id, exc)

    # -- per-process parts --------------------------------------------------------------

    @property
    def cbtasks_breaker(self) -> CircuitBreaker:
        """This process's breaker object for the task's circuit."""
        return self._cached("breaker", self._make_breaker)  # type: ignore[no-any-return]

    @property
    def cbtasks_store(self) -> RedisStore:
        url = _redis_url(self.app)
        prefix = self.cbtasks_prefix
        on_error = self._option("on_error")
        key = f"store:{url}:{prefix}:{on_error}"
        return self._cached(key, lambda: _store(url, prefix, on_error))  # type: ignore[no-any-return]

    @property
    def cbtasks_redis(self) -> Any:
        return self.cbtasks_store.client

    @property
    def cbtasks_prefix(self) -> str:
        return str(self._option("prefix"))

    @property
    def cbtasks_parking(self) -> ParkingLot:
        return self._cached(  # type: ignore[no-any-return]
            "parking",
            lambda: ParkingLot(self.cbtasks_redis, self.cbtasks_prefix, self.cbtasks_breaker.name),
        )

    @property
    def _fallback(self) -> fb.Fallback | None:
        return fb.as_fallback(self.fallback)

    def _make_breaker(self) -> CircuitBreaker:
        return CircuitBreaker(
            self.breaker or self.name,
            policy=self._policy(),
            store=self.cbtasks_store,
            listeners=[metrics().transition],
        )

    def _policy(self) -> BreakerPolicy:
        policy = self.breaker_policy or self.app.conf.get("cbtasks_policy")
        if policy is None:
            return BreakerPolicy()
        if isinstance(policy, dict):
            return BreakerPolicy(**policy)
        if not isinstance(policy, BreakerPolicy):
            raise PolicyError(
                f"cbtasks_policy must be a BreakerPolicy or a dict of its fields, got {policy!r}"
            )
        return policy

    def _cached(self, what: str, make: Any) -> Any:
        key = (os.getpid(), f"{self.name}:{what}")
        value = self._per_process.get(key)
        if value is None:
            value = self._per_process[key] = make()
        return value

    def _option(self, name: str) -> Any:
        value = getattr(self, name, None)
        if value is None:
            value = self.app.conf.get(f"cbtasks_{name}", DEFAULTS[name])
        return value

    def _event(self, type_: str, exc: CircuitOpenError, **fields: Any) -> None:
        """A custom task event: Flower shows the task as CIRCUIT_OPEN / CIRCUIT_FALLBACK."""
        try:
            self.send_event(
                type_, breaker=exc.name, reason=exc.reason, retry_after=exc.retry_after, **fields
            )
        except Exception:  # events are for watching: never fail the task over one
            log.debug("could not send %s for %s", type_, self.request.id, exc_info=True)


class _Releaser:
    """A daemon thread per process that re-publishes parked requests when circuits close."""

    _threads: ClassVar[dict[tuple[int, str], threading.Thread]] = {}
    _lock = threading.Lock()
    interval = 0.2

    @classmethod
    def ensure(cls, task: CircuitBreakerTask) -> None:
        key = (os.getpid(), task.name)
        with cls._lock:
            if key in cls._threads:
                return
            thread = threading.Thread(
                target=cls._run, args=(task,), name=f"cbtasks-release-{task.name}", daemon=True
            )
            cls._threads[key] = thread
            thread.start()

    @classmethod
    def _run(cls, task: CircuitBreakerTask) -> None:
        while True:
            try:
                while task.release_parked():
                    pass
            except _REDIS_DOWN as exc:
                log.warning("cannot release parked requests of %s (%s); retrying", task.name, exc)
                time.sleep(5.0)
            except Exception:
                log.exception("releasing parked requests of %s failed; trying again", task.name)
                time.sleep(1.0)
            time.sleep(cls.interval)


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _start_releasers(sender: Any = None, **_: Any) -> None:
    """Every worker process releases parked requests, even before its first task."""
    app = celery.current_app
    for task in list(app.tasks.values()):
        if isinstance(task, CircuitBreakerTask) and task._option("defer") == "park":
            _Releaser.ensure(task)


def _validate_options(cls: type, name: str) -> None:
    on_open = getattr(cls, "on_open", None)
    if on_open is not None and on_open not in ON_OPEN:
        raise PolicyError(
            f"task {name}: on_open must be one of {', '.join(ON_OPEN)}, got {on_open!r}"
        )
    defer = getattr(cls, "defer", None)
    if defer is not None and defer not in DEFER:
        raise PolicyError(f"task {name}: defer must be one of {', '.join(DEFER)}, got {defer!r}")
    if on_open == "fallback" and getattr(cls, "fallback", None) is None:
        raise PolicyError(f"task {name}: on_open='fallback' needs fallback=...")
    policy = getattr(cls, "breaker_policy", None)
    if policy is not None and not isinstance(policy, BreakerPolicy):
        raise PolicyError(f"task {name}: breaker_policy must be a BreakerPolicy, got {policy!r}")
    try:
        fb.as_fallback(getattr(cls, "fallback", None))
    except TypeError as exc:
        raise PolicyError(f"task {name}: {exc}") from None
    for option in (
        "max_deferrals",
        "defer_deadline",
        "defer_jitter",
        "release_rate",
        "completion_ttl",
    ):
        value = getattr(cls, option, None)
        if value is not None and (not isinstance(value, int | float) or value < 0):
            raise PolicyError(
                f"task {name}: {option} must be a number of at least 0, got {value!r}"
            )


_deferrals = itertools.count(1)


def _collect_now_and_then(every: int) -> None:
    """A full garbage collection every ``every`` deferrals in this process.

    A deferral ends the task with Ignore, and Celery's trace keeps each
    ignored task's exception info in a reference cycle with its own frame
    (the traceback points at the frame that holds it), about 200 KB a task.
    Only a full collection frees those, and a busy worker rarely runs one:
    measured here, 750 deferrals per process grew each by 157 MB; collecting
    every 25 deferrals holds the growth at 15 MB for 2,500 per process.
    """
    if every and next(_deferrals) % every == 0:
        gc.collect()


def _store(url: str, prefix: str, on_error: str) -> RedisStore:
    store = RedisStore(url, prefix=prefix, on_error=on_error)
    store.on_store_error = metrics().store_error
    return store


def _header(request: Any, name: str) -> Any:
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def _redis_url(app: celery.Celery) -> str:
    url = app.conf.get("cbtasks_redis_url")
    if url:
        return str(url)
    broker = str(app.conf.broker_url or "")
    if broker.startswith(("redis://", "rediss://")):
        return broker
    raise PolicyError(
        "set app.conf.cbtasks_redis_url to the Redis that keeps breaker state "
        "(the broker is not Redis, so it cannot be used)"
    )


def _ms_since(start: float) -> float:
    return (perf_counter() - start) * 1000
