"""Limit: how much of an endpoint's capacity the whole fleet may use.

A limit is the endpoint's, like its circuit: every process of every host
using the same breaker shares it through the breaker's store, and it moves
in the same atomic step as the circuit (a slot or a permit is taken when a
call is admitted, given back when its outcome is recorded). Any combination
of four kinds:

- ``concurrency``: calls in flight at once, fleet-wide. Each admitted call
  holds a slot, a lease that ends after ``lease`` seconds even if its holder
  dies (a SIGKILLed worker gives its slots back then).
- ``rate``: calls started per second, smooth (GCRA: a call every 1/rate
  seconds, ``burst`` of them at once at most), so no window edge lets twice
  the rate through.
- ``tokens``: a budget per period (``"90000/m"``), as hosted LLM APIs count
  it: a call reserves ``estimate`` tokens when admitted and settles the
  real count (``usage`` of its result, or :func:`cbtasks.report_tokens`)
  when recorded.
- ``adaptive``: a concurrency limit between ``min_concurrency`` and
  ``max_concurrency`` that moves with what the endpoint says: it shrinks when
  the endpoint answers "overloaded" or its latency rises past
  ``latency_tolerance`` times its no-load latency, and grows while calls
  come back fast and the limit is what holds them back (see ``_limiter``).

A call the limit refuses never reached the endpoint: it raises
:class:`~cbtasks.LimitExceeded` (after waiting up to ``wait`` seconds for a
slot), and a task defers it as it would for an open circuit, spending no retry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ._errors import PolicyError

__all__ = ["Limit", "LimitWire", "parse_rate", "tokens_of"]

_PERIODS = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hour": 3600.0,
    "d": 86400.0, "day": 86400.0,
}  # fmt: skip
_RATE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*", re.IGNORECASE)
_MAX_CONCURRENCY = 100_000
_MAX_RATE = 100_000.0  # calls a second: far beyond what one Redis admits anyway
_MAX_SECONDS = 24 * 3600.0
#: A slot's lease when neither the limit nor the task says how long a call may take.
DEFAULT_LEASE_SECONDS = 60.0

#: Which part of a limit refused a call, as the stores and the scripts number it.
REFUSED_BY = ("", "concurrency", "rate", "tokens")
CONCURRENCY, RATE, TOKENS = 1, 2, 3


def parse_rate(name: str, value: object) -> tuple[float, float]:
    """``(amount, period in seconds)`` from ``"50/s"``, ``"3000/m"``, ``"10/h"``, or a number
    a second."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        amount, period = float(value), 1.0
    elif isinstance(value, str) and (match := _RATE_RE.fullmatch(value)):
        unit = match.group(2).lower()
        if unit not in _PERIODS:
            raise PolicyError(
                f"{name} {value!r}: unknown period {match.group(2)!r}; "
                "write it as 'N/s', 'N/m', 'N/h' or 'N/d'"
            )
        amount, period = float(match.group(1)), _PERIODS[unit]
    else:
        raise PolicyError(
            f"{name} must be like '50/s', '3000/m' or '90000/m', or a number per second, "
            f"got {value!r}"
        )
    if not math.isfinite(amount) or amount <= 0:
        raise PolicyError(f"{name} must be above 0, got {value!r}")
    if amount / period > _MAX_RATE:
        raise PolicyError(f"{name} {value!r} is above {_MAX_RATE:g} a second")
    return amount, period


def tokens_of(result: Any) -> int | None:
    """The tokens a call used, read from its result; None when it does not say.

    Knows the OpenAI shape (``result.usage.total_tokens``, or the same keys in
    a dict: vLLM, TGI's Messages API and most hosted APIs answer so) and TGI's
    ``details.generated_tokens``.
    """
    usage = _field(result, "usage")
    if usage is not None:
        total = _field(usage, "total_tokens")
        if _is_count(total):
            return int(total)
        parts = [_field(usage, key) for key in ("prompt_tokens", "completion_tokens")]
        if all(_is_count(p) for p in parts):
            return int(sum(parts))
    details = _field(result, "details")
    generated = _field(details, "generated_tokens") if details is not None else None
    return generated if isinstance(generated, int) and _is_count(generated) else None


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """How much of an endpoint the whole fleet may use at once, per second, per period.

    ``concurrency``: calls in flight at once across every process.
    ``rate``: calls started per second (``"50/s"``, ``"3000/m"``, or a number
    a second), spaced evenly; ``burst`` calls may start at once after a lull
    (1: never two at the same instant).
    ``tokens``: a budget per period (``"90000/m"``); each call reserves
    ``estimate`` (a number, or a callable taking the call's ``(args, kwargs)``)
    and settles what ``usage`` reads from its result (default
    :func:`tokens_of`: the OpenAI ``usage.total_tokens``), or what the call
    reports with :func:`cbtasks.report_tokens`. A budget may be spent at once
    (a period's worth), as hosted APIs allow.
    ``adaptive``: a concurrency limit that finds the endpoint's capacity,
    from ``concurrency`` (its start; default ``min_concurrency`` x 2) within
    ``min_concurrency`` and ``max_concurrency``; ``latency_tolerance`` is how
    far above its no-load latency a call may come back before it shrinks.
    ``lease``: seconds a slot is held at most (a dead worker's slot comes back
    after it); default the task's ``time_limit`` where it has one, else 60.
    ``wait``: seconds a refused call waits for a slot or permit before
    :class:`~cbtasks.LimitExceeded` (0: refuse at once; a worker's slot is
    worth more than a blocked thread).
    """

    concurrency: int | None = None
    rate: str | float | None = None
    burst: int = 1
    tokens: str | float | None = None
    estimate: int | Callable[[tuple[Any, ...], dict[str, Any]], int] = 1000
    usage: Callable[[Any], int | None] | None = tokens_of
    adaptive: bool = False
    min_concurrency: int = 1
    max_concurrency: int = 1000
    latency_tolerance: float = 1.25
    lease: float | None = None
    wait: float = 0.0

    def __post_init__(self) -> None:
        if self.concurrency is not None:
            _check_int("concurrency", self.concurrency, 1, _MAX_CONCURRENCY)
        if self.rate is not None:
            parse_rate("rate", self.rate)
        _check_int("burst", self.burst, 1, 1_000_000)
        if self.burst > 1 and self.rate is None:
            raise PolicyError("burst needs rate: set rate='50/s' (say), or drop burst")
        if self.tokens is not None:
            parse_rate("tokens", self.tokens)
        if not callable(self.estimate):
            _check_int("estimate", self.estimate, 0, 100_000_000)
        if self.usage is not None and not callable(self.usage):
            raise PolicyError(
                f"usage must be a callable taking the call's result and returning its tokens "
                f"(or None), got {self.usage!r}"
            )
        if not isinstance(self.adaptive, bool):
            raise PolicyError(f"adaptive must be True or False, got {self.adaptive!r}")
        _check_int("min_concurrency", self.min_concurrency, 1, _MAX_CONCURRENCY)
        _check_int("max_concurrency", self.max_concurrency, 1, _MAX_CONCURRENCY)
        if self.max_concurrency < self.min_concurrency:
            raise PolicyError(
                f"max_concurrency ({self.max_concurrency}) must be at least min_concurrency "
                f"({self.min_concurrency})"
            )
        if (
            self.adaptive
            and self.concurrency is not None
            and not (self.min_concurrency <= self.concurrency <= self.max_concurrency)
        ):
            raise PolicyError(
                f"with adaptive=True, concurrency is where the limit starts: "
                f"{self.concurrency} is outside min_concurrency..max_concurrency "
                f"({self.min_concurrency}..{self.max_concurrency})"
            )
        _check_number("latency_tolerance", self.latency_tolerance, 1.05, 100.0)
        if self.lease is not None:
            _check_number("lease", self.lease, 0.01, _MAX_SECONDS)
        _check_number("wait", self.wait, 0.0, _MAX_SECONDS)
        if not (self.concurrency or self.rate or self.tokens or self.adaptive):
            raise PolicyError(
                "a Limit needs at least one of concurrency=, rate=, tokens= or adaptive=True"
            )

    @classmethod
    def coerce(cls, value: object, where: str = "limit") -> Limit | None:
        """A Limit from a Limit, a dict of its fields (settings), or None; PolicyError else."""
        if value is None or isinstance(value, Limit):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise PolicyError(
                    f"{where}: unknown Limit field(s) {', '.join(map(repr, unknown))}; "
                    f"the fields are {', '.join(cls.__dataclass_fields__)}"
                )
            try:
                return cls(**value)
            except PolicyError as exc:
                raise PolicyError(f"{where}: {exc}") from None
        raise PolicyError(f"{where} must be a Limit or a dict of its fields, got {value!r}")

    @property
    def counts_tokens(self) -> bool:
        return self.tokens is not None

    def estimate_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """The tokens a call with these arguments reserves (0 without a token budget)."""
        if self.tokens is None:
            return 0
        if not callable(self.estimate):
            return self.estimate
        value = self.estimate(args, kwargs)
        if not _is_count(value):
            raise PolicyError(
                f"Limit.estimate returned {value!r}: it must return a whole number of tokens"
            )
        return int(value)

    def wire(self, lease: float | None = None) -> LimitWire:
        """The numbers the stores and the Lua scripts read (``lease``: the task's default)."""
        lease_s = self.lease or lease or DEFAULT_LEASE_SECONDS
        rate_ms = burst_ms = 0.0
        if self.rate is not None:
            amount, period = parse_rate("rate", self.rate)
            rate_ms = period * 1000 / amount
            burst_ms = (self.burst - 1) * rate_ms
        token_ms = token_burst_ms = 0.0
        if self.tokens is not None:
            amount, period = parse_rate("tokens", self.tokens)
            token_ms = period * 1000 / amount
            token_burst_ms = period * 1000  # a period's worth may be spent at once
        start = self.concurrency or min(self.max_concurrency, 2 * self.min_concurrency)
        return LimitWire(
            concurrency=0 if self.adaptive else (self.concurrency or 0),
            lease_ms=max(1, round(lease_s * 1000)),
            rate_ms=rate_ms,
            burst_ms=burst_ms,
            token_ms=token_ms,
            token_burst_ms=token_burst_ms,
            adaptive=self.adaptive,
            min_concurrency=self.min_concurrency,
            max_concurrency=self.max_concurrency,
            start=start,
            tolerance=float(self.latency_tolerance),
        )

    def describe(self) -> str:
        """One line for people: ``concurrency 8, rate 50/s (burst 1), tokens 90000/m``."""
        return describe_wire(self.wire())


@dataclass(frozen=True, kw_only=True)
class LimitWire:
    """A limit reduced to numbers: what the Python limiter and the Lua scripts read alike."""

    concurrency: int  # 0: no static concurrency limit
    lease_ms: int
    rate_ms: float  # ms between two calls; 0: no rate limit
    burst_ms: float  # how far ahead of time a call may start (burst - 1 calls' worth)
    token_ms: float  # ms that earn one token; 0: no token budget
    token_burst_ms: float
    adaptive: bool
    min_concurrency: int
    max_concurrency: int
    start: int
    tolerance: float

    @cached_property
    def encoded(self) -> str:
        """One colon-separated string, parsed by ``stores/lua/limit.lua`` in this order."""
        return ":".join(
            repr(v) if isinstance(v, float) else str(int(v))
            for v in (
                self.concurrency,
                self.lease_ms,
                self.rate_ms,
                self.burst_ms,
                self.token_ms,
                self.token_burst_ms,
                self.adaptive,
                self.min_concurrency,
                self.max_concurrency,
                self.start,
                self.tolerance,
            )
        )

    @classmethod
    def decode(cls, text: str) -> LimitWire | None:
        """The wire a script stored (``encoded``); None if it is not one."""
        parts = text.split(":")
        if len(parts) != 11:
            return None
        try:
            return cls(
                concurrency=int(parts[0]),
                lease_ms=int(parts[1]),
                rate_ms=float(parts[2]),
                burst_ms=float(parts[3]),
                token_ms=float(parts[4]),
                token_burst_ms=float(parts[5]),
                adaptive=parts[6] == "1",
                min_concurrency=int(parts[7]),
                max_concurrency=int(parts[8]),
                start=int(parts[9]),
                tolerance=float(parts[10]),
            )
        except ValueError:
            return None

    @property
    def counts_slots(self) -> bool:
        """Whether admitted calls hold a slot (a static or an adaptive concurrency limit)."""
        return bool(self.concurrency) or self.adaptive


def describe_wire(w: LimitWire) -> str:
    """What a limit allows, in one line (the CLI reads the wire a script stored)."""
    parts = []
    if w.adaptive:
        parts.append(f"adaptive {w.min_concurrency}..{w.max_concurrency}")
    elif w.concurrency:
        parts.append(f"concurrency {w.concurrency}")
    if w.rate_ms:
        burst = round(w.burst_ms / w.rate_ms) + 1
        parts.append(
            f"rate {_per_second(1000 / w.rate_ms)}/s" + (f" (burst {burst})" if burst > 1 else "")
        )
    if w.token_ms:
        per_minute = 60_000 / w.token_ms
        parts.append(f"tokens {_per_second(per_minute)}/m")
    return ", ".join(parts)


def _per_second(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 1e-6 else f"{value:.3g}"


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
