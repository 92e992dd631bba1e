"""BreakerPolicy: when a breaker opens, how long it stays open, how it probes.

A policy is a frozen, keyword-only value validated on construction. Every
invalid value raises :class:`PolicyError` naming the field and what it accepts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ._errors import PolicyError
from ._limit import LimitWire
from ._state import Outcome

__all__ = ["BreakerPolicy", "CountWindow", "TimeWindow"]

# A time window is split into this many buckets: the window slides by a tenth
# of its length, and each store update touches at most this many buckets.
TIME_WINDOW_BUCKETS = 10
_MAX_WINDOW_CALLS = 10_000
_MAX_SECONDS = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CountWindow:
    """Failure and slow-call rates over the last ``calls`` recorded calls."""

    calls: int = 100

    def __post_init__(self) -> None:
        _check_int("CountWindow.calls", self.calls, 1, _MAX_WINDOW_CALLS)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeWindow:
    """Failure and slow-call rates over the calls of the last ``seconds``."""

    seconds: float = 60.0

    def __post_init__(self) -> None:
        _check_number("TimeWindow.seconds", self.seconds, 0.01, _MAX_SECONDS)

    @property
    def bucket_ms(self) -> int:
        """Width of one of the window's buckets, in milliseconds."""
        return max(1, round(self.seconds * 1000 / TIME_WINDOW_BUCKETS))


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    """When the circuit opens, how long it stays open and how it recovers.

    Opening: ``failure_threshold`` consecutive failures, or, once the window
    holds ``min_calls`` calls, a failure rate of at least ``failure_rate`` or
    a slow-call rate of at least ``slow_call_rate`` (a call is slow when it
    takes longer than ``slow_call_seconds``). A failure that carries a
    Retry-After (HTTP 429/503) opens the circuit at once for at least that
    long when ``honor_retry_after`` is true.

    Open: ``open_seconds`` at the first trip, multiplied by ``backoff_factor``
    at each further trip without a close in between, up to
    ``max_open_seconds``, then stretched by up to ``jitter`` (a fraction).

    Half-open: at most ``half_open_probes`` calls at once go through;
    ``half_open_successes`` successful probes close the circuit, one failed
    probe reopens it. A probe not reported within ``probe_lease_seconds``
    (its worker died) gives its slot back.

    Exceptions: ``classify`` (a callable taking the exception and returning
    an :class:`Outcome`, or None to let the defaults decide) is asked first.
    Instances of ``ignored_exceptions`` are the caller's own errors, counted
    as neither success nor failure, in addition to those the defaults know
    (:class:`CallerError`, a 4xx, an SDK's bad-request, auth and not-found
    errors: see :func:`cbtasks.default_classify`). Of the rest, instances of
    ``failure_exceptions`` are endpoint failures; any other exception is
    counted as a success, since the endpoint answered.
    """

    failure_threshold: int = 5
    failure_rate: float | None = None
    slow_call_seconds: float | None = None
    slow_call_rate: float | None = None
    window: CountWindow | TimeWindow = field(default_factory=CountWindow)
    min_calls: int = 10
    open_seconds: float = 10.0
    backoff_factor: float = 1.0
    max_open_seconds: float = 300.0
    jitter: float = 0.0
    half_open_probes: int = 1
    half_open_successes: int = 1
    probe_lease_seconds: float = 30.0
    honor_retry_after: bool = True
    failure_exceptions: tuple[type[BaseException], ...] = (Exception,)
    ignored_exceptions: tuple[type[BaseException], ...] = ()
    classify: Callable[[BaseException], Outcome | None] | None = None

    def __post_init__(self) -> None:
        _check_int("failure_threshold", self.failure_threshold, 1, 1_000_000)
        if self.failure_rate is not None:
            _check_rate("failure_rate", self.failure_rate)
        if self.slow_call_seconds is not None:
            _check_number("slow_call_seconds", self.slow_call_seconds, 0.001, _MAX_SECONDS)
        if self.slow_call_rate is not None:
            _check_rate("slow_call_rate", self.slow_call_rate)
            if self.slow_call_seconds is None:
                raise PolicyError(
                    "slow_call_rate needs slow_call_seconds: set slow_call_seconds to the "
                    "duration above which a call counts as slow"
                )
        if not isinstance(self.window, CountWindow | TimeWindow):
            raise PolicyError(
                f"window must be CountWindow(calls=...) or TimeWindow(seconds=...), "
                f"got {self.window!r}"
            )
        _check_int("min_calls", self.min_calls, 1, _MAX_WINDOW_CALLS)
        if isinstance(self.window, CountWindow) and self.min_calls > self.window.calls:
            raise PolicyError(
                f"min_calls ({self.min_calls}) is larger than the window "
                f"({self.window.calls} calls), so the rates would never be checked: "
                "lower min_calls or widen the window"
            )
        _check_number("open_seconds", self.open_seconds, 0.001, _MAX_SECONDS)
        _check_number("backoff_factor", self.backoff_factor, 1.0, 100.0)
        _check_number("max_open_seconds", self.max_open_seconds, 0.001, _MAX_SECONDS)
        if self.max_open_seconds < self.open_seconds:
            raise PolicyError(
                f"max_open_seconds ({self.max_open_seconds}) must be at least "
                f"open_seconds ({self.open_seconds})"
            )
        _check_number("jitter", self.jitter, 0.0, 1.0)
        _check_int("half_open_probes", self.half_open_probes, 1, 10_000)
        _check_int("half_open_successes", self.half_open_successes, 1, 10_000)
        _check_number("probe_lease_seconds", self.probe_lease_seconds, 0.01, _MAX_SECONDS)
        if not isinstance(self.honor_retry_after, bool):
            raise PolicyError(
                f"honor_retry_after must be True or False, got {self.honor_retry_after!r}"
            )
        _check_exceptions("failure_exceptions", self.failure_exceptions)
        _check_exceptions("ignored_exceptions", self.ignored_exceptions)
        if self.classify is not None and not callable(self.classify):
            raise PolicyError(
                f"classify must be a callable taking the exception and returning an Outcome "
                f"or None, got {self.classify!r}"
            )

    @property
    def uses_window(self) -> bool:
        """True when a failure or slow-call rate is checked."""
        return self.failure_rate is not None or self.slow_call_rate is not None

    @property
    def longest_open_seconds(self) -> float:
        """The longest open period the backoff can give, jitter included.

        A process trusts no longer one (a forged state hash, an hour's
        Retry-After) without asking the store again.
        """
        return self.max_open_seconds * (1 + self.jitter)

    def wire(self) -> PolicyWire:
        """The numbers the state machine needs, as stores pass them around."""
        window = self.window
        if not self.uses_window:
            kind, size, bucket_ms = 0, 0, 0
        elif isinstance(window, CountWindow):
            kind, size, bucket_ms = 1, window.calls, 0
        else:
            kind, size, bucket_ms = 2, TIME_WINDOW_BUCKETS, window.bucket_ms
        return PolicyWire(
            failure_threshold=self.failure_threshold,
            window_kind=kind,
            window_size=size,
            bucket_ms=bucket_ms,
            min_calls=self.min_calls,
            failure_rate=-1.0 if self.failure_rate is None else float(self.failure_rate),
            slow_rate=-1.0 if self.slow_call_rate is None else float(self.slow_call_rate),
            open_ms=_ms(self.open_seconds),
            backoff_factor=float(self.backoff_factor),
            max_open_ms=_ms(self.max_open_seconds),
            jitter=float(self.jitter),
            half_open_probes=self.half_open_probes,
            half_open_successes=self.half_open_successes,
            lease_ms=_ms(self.probe_lease_seconds),
            honor_retry_after=self.honor_retry_after,
        )


@dataclass(frozen=True, kw_only=True)
class PolicyWire:
    """A policy reduced to integers and floats: what the state machines read.

    The Python machine and the Redis Lua scripts read the same numbers, so
    both compute identical transitions (see ``encoded``). A breaker with a
    :class:`~cbtasks.Limit` adds its ``limit`` (sent to the scripts apart).
    """

    failure_threshold: int
    window_kind: int  # 0: none, 1: count window, 2: time window
    window_size: int  # calls in a count window, buckets in a time window
    bucket_ms: int
    min_calls: int
    failure_rate: float  # -1: not checked
    slow_rate: float  # -1: not checked
    open_ms: int
    backoff_factor: float
    max_open_ms: int
    jitter: float
    half_open_probes: int
    half_open_successes: int
    lease_ms: int
    honor_retry_after: bool
    limit: LimitWire | None = None

    @cached_property
    def encoded(self) -> str:
        """One colon-separated string, parsed by the Lua scripts in this order."""
        return ":".join(
            repr(v) if isinstance(v, float) else str(int(v))
            for v in (
                self.failure_threshold,
                self.window_kind,
                self.window_size,
                self.bucket_ms,
                self.min_calls,
                self.failure_rate,
                self.slow_rate,
                self.open_ms,
                self.backoff_factor,
                self.max_open_ms,
                self.jitter,
                self.half_open_probes,
                self.half_open_successes,
                self.lease_ms,
                self.honor_retry_after,
            )
        )

    @property
    def window_signature(self) -> str:
        """Changes whenever recorded window data would no longer fit the window."""
        return f"{self.window_kind}:{self.window_size}:{self.bucket_ms}"


# Exponents beyond this cannot matter: any factor > 1 has hit the cap long before.
_MAX_BACKOFF_EXPONENT = 64


def open_duration_ms(wire: PolicyWire, trips: int, rand: float) -> int:
    """Open duration for the ``trips``-th consecutive trip; mirrored in Lua."""
    exponent = min(max(trips - 1, 0), _MAX_BACKOFF_EXPONENT)
    base = min(wire.open_ms * wire.backoff_factor**exponent, float(wire.max_open_ms))
    return math.floor(base * (1.0 + wire.jitter * rand))


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PolicyError(f"{name} must be a whole number from {low} to {high}, got {value!r}")


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise PolicyError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")


def _check_rate(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= 1
    ):
        raise PolicyError(
            f"{name} must be a fraction above 0 and at most 1 (0.5 means 50%), got {value!r}"
        )


def _check_exceptions(name: str, value: object) -> None:
    if not isinstance(value, tuple) or not all(
        isinstance(e, type) and issubclass(e, BaseException) for e in value
    ):
        raise PolicyError(f"{name} must be a tuple of exception classes, got {value!r}")


def with_shorthand(
    policy: BreakerPolicy, fail_max: int | None, reset_timeout: float | None
) -> BreakerPolicy:
    """Apply the original API's ``fail_max``/``reset_timeout`` to a policy."""
    if not isinstance(policy, BreakerPolicy):
        raise PolicyError(f"policy must be a BreakerPolicy, got {policy!r}")
    changes: dict[str, Any] = {}
    if fail_max is not None:
        changes["failure_threshold"] = fail_max
    if reset_timeout is not None:
        changes["open_seconds"] = reset_timeout
        if isinstance(reset_timeout, int | float) and reset_timeout > policy.max_open_seconds:
            changes["max_open_seconds"] = reset_timeout
    try:
        return dataclasses.replace(policy, **changes) if changes else policy
    except PolicyError as exc:
        message = re.sub(r"\bfailure_threshold\b", "fail_max", str(exc))
        raise PolicyError(re.sub(r"\bopen_seconds\b", "reset_timeout", message)) from None
