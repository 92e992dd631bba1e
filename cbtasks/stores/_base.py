"""What every store offers a breaker, and the replies it gives."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from .._errors import PolicyError
from .._machine import CLOSED, OPEN, Transition
from .._policy import PolicyWire
from .._state import Mode, Outcome, State

__all__ = [
    "HEALTHY",
    "AsyncStore",
    "BreakerStatus",
    "CallResult",
    "HistoryEntry",
    "LimitStatus",
    "LocalView",
    "Reply",
    "Store",
    "validate_name",
]

MAX_NAME_LENGTH = 200
# Braces would break the Redis Cluster hash tag, whitespace and control
# characters the CLI and the news channel's line format.
_NAME_RE = re.compile(r"[^\s{}]+")


def validate_name(name: object) -> str:
    """Return ``name`` if it can name a breaker, else raise PolicyError saying why."""
    if not isinstance(name, str) or not name:
        raise PolicyError(f"a breaker name must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise PolicyError(
            f"breaker name is {len(name)} characters long; use at most {MAX_NAME_LENGTH}"
        )
    if not _NAME_RE.fullmatch(name):
        raise PolicyError(
            f"breaker name {name!r} may not contain whitespace or braces; "
            "use letters, digits and punctuation such as '-', '.', ':' or '/'"
        )
    return name


@dataclass(frozen=True, slots=True)
class CallResult:
    """How an admitted call went, as a store records it.

    ``probe_id`` is what the admission returned (None for a plain call),
    ``slow`` whether it took longer than the policy's slow-call threshold,
    ``retry_after_ms`` the endpoint's own "not before" (0: it said nothing).
    Under a limit: ``slot`` the slot the call held (None: none), ``reserved``
    the tokens it reserved and ``used`` those it used (-1: unknown, the
    reservation stands), ``latency_ms`` how long it took (-1: not timed).
    """

    probe_id: str | None
    outcome: Outcome
    slow: bool = False
    retry_after_ms: int = 0
    slot: str | None = None
    reserved: int = 0
    used: int = -1
    latency_ms: float = -1.0
    #: What a failure was ("Type: message", no credentials), kept as the last one.
    failure: str = ""

    @property
    def healthy(self) -> bool:
        """A plain, fast success: the path most calls take, which skips the machine."""
        return (
            self.probe_id is None
            and self.outcome is Outcome.SUCCESS
            and not self.slow
            and not self.limited
        )

    @property
    def limited(self) -> bool:
        """The call holds something of its limit to give back (a slot, reserved tokens)."""
        return self.slot is not None or self.reserved > 0


#: A plain call that succeeded in time: made once, since most calls are this one.
HEALTHY = CallResult(None, Outcome.SUCCESS)


class Reply(NamedTuple):
    """A store's answer to an admission, a record or a command.

    ``state``/``remaining_ms``/``mode``/``version`` describe the breaker after
    the operation; ``cacheable`` is false when the answer did not come from the
    shared state (the store is unreachable and ``on_error`` decided). An
    admission the limit refused has ``refused_by`` (1 concurrency, 2 rate,
    3 tokens); one it admitted ahead of time, ``delay_ms`` to sleep first.
    """

    admitted: bool
    probe_id: str | None
    retry_after_ms: int
    state: int
    remaining_ms: int
    mode: int
    version: int
    now_ms: int
    transitions: tuple[Transition, ...]
    cacheable: bool = True
    refused_by: int = 0
    delay_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitStatus:
    """A breaker's limit as an operator sees it (fleet-wide, read from the store)."""

    #: What the limit allows, in one line ("concurrency 8, rate 50/s").
    allows: str
    #: Calls holding a slot now (under a concurrency or adaptive limit).
    in_flight: int
    #: The concurrency limit now: the static one, or where the adaptive one stands.
    concurrency: float | None
    #: Calls admitted in the last whole second.
    admitted_last_second: int
    #: Tokens that may be spent now, under a token budget (else None).
    tokens_available: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryEntry:
    """One line of a breaker's history: a transition, or an operator's command.

    ``at`` is seconds since the epoch on the store's clock (Redis's own);
    ``failure`` the last failure counted, on a trip; ``command``, ``by`` and
    ``why`` an operator's command and what they said of it.
    """

    at: float
    from_state: str | None = None
    to_state: str | None = None
    reason: str = ""
    failure: str | None = None
    command: str | None = None
    by: str | None = None
    why: str | None = None
    #: The state when a command changed none.
    state: str | None = None

    def as_dict(self) -> dict[str, object]:
        """Plain data (``--json``), without the empty fields."""
        fields = (
            "at", "from_state", "to_state", "reason", "failure", "command", "by", "why", "state"
        )  # fmt: skip
        return {f: getattr(self, f) for f in fields if getattr(self, f) not in (None, "")}


#: A breaker's history keeps about this many entries (stores/lua/constants.lua's too).
HISTORY_LENGTH = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerStatus:
    """One breaker as an operator sees it."""

    name: str
    state: State
    mode: Mode
    open_until: float | None
    trips: int
    consecutive_failures: int
    window_calls: int
    window_failures: int
    window_slow: int
    probes_in_use: int
    #: Seconds until an open circuit lets a probe through (0 unless open).
    retry_after: float = 0.0
    #: Its limit, when its workers use one.
    limit: LimitStatus | None = None
    #: The last failure counted ("ConnectionError: ..."): why it opened, if it did.
    last_failure: str | None = None
    #: Every trip since it was made or reset (``trips``: those in a row, which a close clears).
    trips_total: int = 0


class LocalView:
    """What one process last heard from the store of a breaker, so most calls skip it.

    ``closed`` means admit without asking; ``reject_until`` (on the store's
    local clock) means reject without asking until then. Anything else asks.
    Replies carry the breaker's version, so an older reply never overwrites a
    newer one; news of a newer version makes the process ask again (:meth:`hint`).
    """

    __slots__ = ("_lock", "closed", "half_open", "mode", "reject_until", "version")

    def __init__(self) -> None:
        self.closed = False
        self.reject_until = 0.0
        #: The local rejection is a half-open circuit's (every probe slot taken).
        self.half_open = False
        self.mode = int(Mode.NORMAL)
        self.version = -1
        self._lock = threading.Lock()

    def apply(self, state: int, remaining_ms: int, mode: int, version: int, now: float) -> None:
        """Take a store's reply about the breaker's state, unless a newer one came first."""
        with self._lock:
            if version <= self.version:
                return  # old news, or news we already have (a late echo of our own)
            self.version = version
            self.mode = int(mode)
            self.closed = state == CLOSED and mode != Mode.FORCED_OPEN
            self.reject_until = now + remaining_ms / 1000 if state == OPEN else 0.0
            self.half_open = False

    def hint(self, version: int) -> None:
        """News of a newer version: ask the store next time (news is a hint, never the state).

        Anyone who can write to Redis can publish; so news only makes a
        process look again, and what it then caches comes from a script's reply.
        """
        with self._lock:
            if version > self.version:
                self.closed = False
                self.reject_until = 0.0
                self.half_open = False
                self.version = -1

    def hold_off(self, until: float, half_open: bool = True) -> None:
        """Reject locally until ``until``: every probe slot is taken."""
        self.half_open = half_open
        self.reject_until = until

    def forget(self) -> None:
        """Ask the store next time: the news may have been missed."""
        with self._lock:
            self.closed = False
            self.reject_until = 0.0
            self.half_open = False
            self.version = -1


class Store(Protocol):
    """Where breakers keep their state. Each method is one atomic step.

    A Protocol is matched by structure: mypy checks each store against it.
    """

    #: The clock, in seconds, that a LocalView's ``reject_until`` is read on.
    local_clock: Callable[[], float]

    def view(self, name: str) -> LocalView:
        """This process's shared cache of the breaker ``name``."""
        ...

    def admit(
        self, name: str, policy: PolicyWire, probe_id: str, tokens: int = 0, wait_ms: int = 0
    ) -> Reply:
        """May a call go through? ``probe_id`` names it if it becomes a probe, and the
        slot it holds under a limit (``policy.limit``), with ``tokens`` reserved; it
        may start up to ``wait_ms`` later for a rate or token permit."""
        ...

    def record(self, name: str, policy: PolicyWire, call: CallResult) -> Reply:
        """Count how an admitted call went."""
        ...

    def control(self, name: str, policy: PolicyWire, op: str, by: str = "", why: str = "") -> Reply:
        """An operator's command: force_open, force_close, force_half_open, reset, disable,
        enable; ``by`` who gave it and ``why``, for the history."""
        ...

    def history(self, name: str, since: float = 0.0, count: int = 100) -> list[HistoryEntry]:
        """The breaker's newest ``count`` history entries since ``since`` (epoch seconds),
        oldest first."""
        ...

    def status(self, name: str, policy: PolicyWire) -> BreakerStatus | None:
        """The breaker as an operator sees it, or None if it has no state yet."""
        ...

    def names(self) -> list[str]:
        """The names of every breaker with state in this store."""
        ...

    def claim(self, name: str, what: str, ttl_ms: int) -> bool:
        """Take the fleet's turn at ``what`` for breaker ``name`` for ``ttl_ms``.

        True for exactly one caller until the turn runs out (a health check
        made by one process for the whole fleet); False when Redis is down.
        """
        ...


class AsyncStore(Protocol):
    """A store whose operations are awaited (AsyncRedisStore): the Store's, as coroutines."""

    local_clock: Callable[[], float]

    def view(self, name: str) -> LocalView: ...

    async def admit(
        self, name: str, policy: PolicyWire, probe_id: str, tokens: int = 0, wait_ms: int = 0
    ) -> Reply: ...

    async def record(self, name: str, policy: PolicyWire, call: CallResult) -> Reply: ...

    async def control(
        self, name: str, policy: PolicyWire, op: str, by: str = "", why: str = ""
    ) -> Reply: ...

    async def history(
        self, name: str, since: float = 0.0, count: int = 100
    ) -> list[HistoryEntry]: ...

    async def status(self, name: str, policy: PolicyWire) -> BreakerStatus | None: ...
