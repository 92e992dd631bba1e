"""MemoryStore: breaker state for the threads of one process."""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import _limiter as limiter
from .. import _machine as machine
from .._limit import describe_wire
from .._policy import PolicyWire
from .._state import STATE_BY_CODE, Mode, Outcome
from ._base import (
    HISTORY_LENGTH,
    BreakerStatus,
    CallResult,
    HistoryEntry,
    LimitStatus,
    LocalView,
    Reply,
)
from ._keys import DEFAULT_PREFIX

__all__ = ["LocalKeys", "MemoryStore", "process_store"]

# Version -1 is older than any news: a breaker learns nothing from this reply.
_NOTHING_NEW = Reply(True, None, 0, machine.CLOSED, 0, Mode.NORMAL, -1, 0, ())


class LocalKeys:
    """A few keys with expiries, in this process: what a task keeps in Redis (its
    completion marks, a CachedResult's answers) when its breaker state is ``memory://``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._values: dict[str, tuple[Any, float]] = {}

    def __repr__(self) -> str:
        return f"LocalKeys({len(self._values)} keys)"

    def get(self, key: str) -> Any:
        with self._lock:
            held = self._values.get(key)
            if held is None:
                return None
            if held[1] <= self._clock():
                del self._values[key]
                return None
            return held[0]

    def set(self, key: str, value: Any, px: int | None = None, **_: Any) -> bool:
        expires = math.inf if px is None else self._clock() + px / 1000
        encoded = value.encode() if isinstance(value, str) else value
        with self._lock:
            self._values[key] = (encoded, expires)
        return True

    def delete(self, *keys: str) -> int:
        with self._lock:
            return sum(1 for key in keys if self._values.pop(key, None) is not None)

    def flushall(self) -> None:
        with self._lock:
            self._values.clear()


class MemoryStore:
    """Keeps breaker state in this process; thread-safe.

    ``clock`` returns seconds since the epoch (tests pass a fake one). Its
    ``client`` keeps the few keys a task would keep in Redis (``LocalKeys``).
    """

    #: The key prefix (a RedisStore's, for the parts that name keys alike).
    prefix = DEFAULT_PREFIX

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.local_clock = clock
        self._rand = rand
        self._lock = threading.Lock()
        self._snapshots: dict[str, machine.Snapshot] = {}
        self._limiters: dict[str, tuple[limiter.LimiterState, PolicyWire]] = {}
        self._histories: dict[str, deque[HistoryEntry]] = {}
        self._views: dict[str, LocalView] = {}
        self._claims: dict[tuple[str, str], int] = {}
        #: The keys a task keeps beside its breaker state (completion marks, a cache).
        self.client = LocalKeys()

    def __repr__(self) -> str:
        return f"MemoryStore(breakers={len(self._snapshots)})"

    def view(self, name: str) -> LocalView:
        with self._lock:
            view = self._views.get(name)
            if view is None:
                view = self._views[name] = LocalView()
            return view

    def admit(
        self, name: str, policy: PolicyWire, probe_id: str, tokens: int = 0, wait_ms: int = 0
    ) -> Reply:
        with self._lock:
            exact = self.local_clock() * 1000
            now = int(exact)
            snap = self._snapshot(name)
            decision = machine.admit(snap, policy, now, probe_id)
            admitted, probe, retry_after = (
                decision.admitted,
                decision.probe_id,
                decision.retry_after_ms,
            )
            refused_by, delay = 0, 0
            # Shadow mode admits every call: the limit, like the circuit, only watches.
            if admitted and policy.limit is not None and snap.mode != Mode.DISABLED:
                state = self._limiter(name, policy)
                taken = limiter.acquire(state, policy.limit, exact, probe_id, tokens, wait_ms)
                if taken.refused_by:
                    if probe is not None:  # a probe slot taken above goes back
                        snap.probes.pop(probe, None)
                    admitted, probe = False, None
                    retry_after, refused_by = math.ceil(taken.retry_after_ms), taken.refused_by
                else:
                    delay = math.ceil(taken.delay_ms)
            reply = self._reply(
                name, snap, policy, now, decision.transitions, admitted, probe, retry_after
            )
            return reply._replace(refused_by=refused_by, delay_ms=delay)

    def record(self, name: str, policy: PolicyWire, call: CallResult) -> Reply:
        if call.healthy and not policy.window_kind:
            # The healthy path: a success in a closed circuit only clears the
            # failure count, and reading a field needs no lock.
            snap = self._snapshots.get(name)
            if snap is not None and snap.state == machine.CLOSED:
                if snap.consecutive:
                    with self._lock:
                        snap.consecutive = 0
                return _NOTHING_NEW
        with self._lock:
            exact = self.local_clock() * 1000
            now = int(exact)
            snap = self._snapshot(name)
            rand = self._rand() if policy.jitter else 0.0
            outcome = call.outcome
            # "Overloaded" is the endpoint busy, not failing: with an adaptive limit
            # it shrinks the limit and counts toward opening only at its minimum.
            counts = outcome == Outcome.OVERLOAD
            if policy.limit is not None and call.limited:
                state = self._limiter(name, policy)
                counts = limiter.release(
                    state,
                    policy.limit,
                    exact,
                    call.slot or "",
                    call.reserved,
                    call.used,
                    call.latency_ms,
                    int(outcome),
                )
            if outcome == Outcome.OVERLOAD:
                outcome = Outcome.FAILURE if counts else Outcome.IGNORED
            transitions = machine.record(
                snap,
                policy,
                now,
                call.probe_id,
                outcome,
                call.slow,
                call.retry_after_ms,
                rand,
                call.failure,
            )
            return self._reply(name, snap, policy, now, tuple(transitions))

    def control(self, name: str, policy: PolicyWire, op: str, by: str = "", why: str = "") -> Reply:
        with self._lock:
            now = self._now_ms()
            snap = self._snapshot(name)
            transitions = machine.control(snap, policy, now, op)
            said = None if op == "healthy" else {"command": op, "by": by[:200], "why": why[:500]}
            held = self._limiters.get(name)
            if op == "reset" and held is not None:
                # As in Redis: the limit's learning is forgotten, the calls in flight
                # keep their slots (they are still at the endpoint).
                self._limiters[name] = (limiter.LimiterState(slots=held[0].slots), held[1])
            return self._reply(name, snap, policy, now, tuple(transitions), said=said)

    def status(self, name: str, policy: PolicyWire, *, strict: bool = True) -> BreakerStatus | None:
        with self._lock:
            snap = self._snapshots.get(name)
            if snap is None:
                return None
            now = self._now_ms()
            state, remaining = machine.observe(snap, now, policy)
            return BreakerStatus(
                name=name,
                state=STATE_BY_CODE[state],
                mode=Mode(snap.mode),
                open_until=snap.open_until / 1000 if state == machine.OPEN else None,
                trips=snap.trips,
                consecutive_failures=snap.consecutive,
                window_calls=snap.calls,
                window_failures=snap.failures,
                window_slow=snap.slow,
                probes_in_use=sum(1 for end in snap.probes.values() if end > now)
                if state == machine.HALF_OPEN
                else 0,
                retry_after=remaining / 1000 if state == machine.OPEN else 0.0,
                limit=self._limit_status(name, self.local_clock() * 1000),
                last_failure=snap.last_failure or None,
                trips_total=snap.trips_total,
            )

    def _limiter(self, name: str, policy: PolicyWire) -> limiter.LimiterState:
        """Breaker ``name``'s limiter state; the limit it was last used with is what
        operators read."""
        held = self._limiters.get(name)
        if held is None or held[1] is not policy:
            state = held[0] if held is not None else limiter.LimiterState()
            self._limiters[name] = (state, policy)
            return state
        return held[0]

    def _limit_status(self, name: str, now: float) -> LimitStatus | None:
        held = self._limiters.get(name)
        if held is None or held[1].limit is None:
            return None
        state, wire = held[0], held[1].limit
        in_flight, concurrency, last_second, tokens = limiter.observe(state, wire, now)
        return LimitStatus(
            allows=describe_wire(wire),
            in_flight=in_flight,
            concurrency=concurrency if wire.counts_slots else None,
            admitted_last_second=last_second,
            tokens_available=tokens if wire.token_ms else None,
        )

    def reset_all(self) -> None:
        """Forget every breaker and key (between tests); the views ask again."""
        with self._lock:
            self._snapshots.clear()
            self._limiters.clear()
            self._claims.clear()
            for view in self._views.values():
                view.forget()
        self.client.flushall()

    def add_news_hook(self, hook: Callable[[str], None]) -> None:
        """No news in one process: a breaker's own replies are the news."""

    def remove_news_hook(self, hook: Callable[[str], None]) -> None:
        """No news in one process."""

    def forget(self, name: str) -> None:
        """Drop breaker ``name``'s state (a RedisStore's stand-in, once Redis is back)."""
        with self._lock:
            self._snapshots.pop(name, None)
            self._limiters.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._snapshots)

    def claim(self, name: str, what: str, ttl_ms: int) -> bool:
        with self._lock:
            now = self._now_ms()
            if self._claims.get((name, what), 0) > now:
                return False
            self._claims[(name, what)] = now + ttl_ms
            return True

    def _now_ms(self) -> int:
        return int(self.local_clock() * 1000)

    def _snapshot(self, name: str) -> machine.Snapshot:
        snap = self._snapshots.get(name)
        if snap is None:
            snap = self._snapshots[name] = machine.Snapshot()
        return snap

    def history(self, name: str, since: float = 0.0, count: int = 100) -> list[HistoryEntry]:
        with self._lock:
            entries = [e for e in self._histories.get(name, ()) if e.at >= since]
        return entries[-max(1, count) :]

    def _note(
        self,
        name: str,
        snap: machine.Snapshot,
        now: int,
        transitions: list[machine.Transition] | tuple[machine.Transition, ...],
        command: str | None = None,
        by: str = "",
        why: str = "",
    ) -> None:
        """Every transition (the last failure with a trip), and an operator's command, to
        the history (common.lua's note_history, in Python)."""
        if not transitions and command is None:
            return
        history = self._histories.setdefault(name, deque(maxlen=HISTORY_LENGTH))
        by_, why_ = (by or None, why or None) if command is not None else (None, None)
        if not transitions:
            state = STATE_BY_CODE[snap.state].value
            history.append(
                HistoryEntry(at=now / 1000, state=state, command=command, by=by_, why=why_)
            )
        for from_code, to_code, reason in transitions:
            failure = snap.last_failure if to_code == machine.OPEN and snap.last_failure else None
            history.append(
                HistoryEntry(
                    at=now / 1000,
                    from_state=STATE_BY_CODE[from_code].value,
                    to_state=STATE_BY_CODE[to_code].value,
                    reason=reason,
                    failure=failure,
                    command=command,
                    by=by_,
                    why=why_,
                )
            )

    def _reply(
        self,
        name: str,
        snap: machine.Snapshot,
        policy: PolicyWire,
        now: int,
        transitions: tuple[machine.Transition, ...],
        admitted: bool = True,
        probe_id: str | None = None,
        retry_after_ms: int = 0,
        said: dict[str, str] | None = None,
    ) -> Reply:
        said = said or {}
        self._note(name, snap, now, transitions, said.get("command"), **_who(said))
        state, remaining = machine.observe(snap, now, policy)
        view = self._views.get(name)
        if view is not None and view.version != snap.version:
            # Every breaker object of this name in the process learns at once.
            view.apply(state, remaining, snap.mode, snap.version, now / 1000)
        return Reply(
            admitted,
            probe_id,
            retry_after_ms,
            state,
            remaining,
            snap.mode,
            snap.version,
            now,
            transitions,
        )


def _who(said: dict[str, str]) -> dict[str, str]:
    return {"by": said.get("by", ""), "why": said.get("why", "")}


_process_store: MemoryStore | None = None
_process_store_lock = threading.Lock()


def process_store() -> MemoryStore:
    """The one MemoryStore of this process that ``memory://`` names: every task and test
    fixture of the process shares it (a forked child starts from a copy of its parent's)."""
    global _process_store
    with _process_store_lock:
        if _process_store is None:
            _process_store = MemoryStore()
        return _process_store
