"""MemoryStore: breaker state for the threads of one process."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from .. import _machine as machine
from .._policy import PolicyWire
from .._state import STATE_BY_CODE, Mode
from ._base import BreakerStatus, CallResult, LocalView, Reply

__all__ = ["MemoryStore"]

# Version -1 is older than any news: a breaker learns nothing from this reply.
_NOTHING_NEW = Reply(True, None, 0, machine.CLOSED, 0, Mode.NORMAL, -1, 0, ())


class MemoryStore:
    """Keeps breaker state in this process; thread-safe.

    ``clock`` returns seconds since the epoch (tests pass a fake one).
    """

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
        self._views: dict[str, LocalView] = {}
        self._claims: dict[tuple[str, str], int] = {}

    def __repr__(self) -> str:
        return f"MemoryStore(breakers={len(self._snapshots)})"

    def view(self, name: str) -> LocalView:
        with self._lock:
            view = self._views.get(name)
            if view is None:
                view = self._views[name] = LocalView()
            return view

    def admit(self, name: str, policy: PolicyWire, probe_id: str) -> Reply:
        with self._lock:
            now = self._now_ms()
            snap = self._snapshot(name)
            decision = machine.admit(snap, policy, now, probe_id)
            return self._reply(
                name,
                snap,
                policy,
                now,
                decision.transitions,
                decision.admitted,
                decision.probe_id,
                decision.retry_after_ms,
            )

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
            now = self._now_ms()
            snap = self._snapshot(name)
            rand = self._rand() if policy.jitter else 0.0
            transitions = machine.record(
                snap, policy, now, call.probe_id, call.outcome, call.slow, call.retry_after_ms, rand
            )
            return self._reply(name, snap, policy, now, tuple(transitions))

    def control(self, name: str, policy: PolicyWire, op: str) -> Reply:
        with self._lock:
            now = self._now_ms()
            snap = self._snapshot(name)
            transitions = machine.control(snap, policy, now, op)
            return self._reply(name, snap, policy, now, tuple(transitions))

    def status(self, name: str, policy: PolicyWire) -> BreakerStatus | None:
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
            )

    def forget(self, name: str) -> None:
        """Drop breaker ``name``'s state (a RedisStore's stand-in, once Redis is back)."""
        with self._lock:
            self._snapshots.pop(name, None)

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
    ) -> Reply:
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
