"""The breaker's state machine: no I/O, no clock, no randomness inside.

Every function takes the snapshot, the policy (as a :class:`PolicyWire`) and
the time ``now`` in milliseconds, plus any random number it needs, and returns
the transitions it made as ``(from_code, to_code, reason)`` tuples.

The functions update the snapshot in place rather than returning a copy: a
store calls them under its own lock (or inside one Lua script), and copying a
100-call window on every call would cost more than the call being guarded.
Tests copy a snapshot with :meth:`Snapshot.copy` when they need the old one.

``stores/lua/common.lua`` (with ``admit.lua``, ``record.lua`` and
``control.lua``) is the same machine in Lua, for Redis; the contract tests
and the property tests hold the two to identical behaviour.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from ._policy import PolicyWire, open_duration_ms
from ._state import Mode, Outcome

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
#: A request that finds every probe slot taken waits at least this long (ms);
#: stores/lua/constants.lua names the same number for the Lua machine.
MIN_STRAGGLER_WAIT_MS = 100

# Bits of one entry of a count window's ring.
_CALL, _FAILED, _SLOW = 1, 2, 4

Transition = tuple[int, int, str]


@dataclass(slots=True)
class Snapshot:
    """Everything a store keeps for one breaker."""

    state: int = CLOSED
    mode: int = Mode.NORMAL
    open_until: int = 0
    trips: int = 0
    consecutive: int = 0
    calls: int = 0
    failures: int = 0
    slow: int = 0
    window_signature: str = ""
    ring: bytearray = field(default_factory=bytearray)
    ring_pos: int = 0
    buckets: list[list[int]] = field(default_factory=list)
    last_epoch: int = 0
    probes: dict[str, int] = field(default_factory=dict)
    probe_successes: int = 0
    #: Grows at every change of state or mode: lets caches drop stale news.
    version: int = 0
    #: The last failure counted ("Type: message"), for operators.
    last_failure: str = ""
    #: Every trip since the breaker was made or reset (``trips`` counts those in a
    #: row, and sets the backoff; a close clears it).
    trips_total: int = 0

    def copy(self) -> Snapshot:
        return copy.deepcopy(self)


@dataclass(frozen=True, slots=True)
class Admission:
    """A store's answer to "may this call go through?"."""

    admitted: bool
    probe_id: str | None
    retry_after_ms: int
    transitions: tuple[Transition, ...]


def observe(snap: Snapshot, now: int, w: PolicyWire) -> tuple[int, int]:
    """The state as a caller sees it at ``now``, and ms until it may change.

    An open circuit whose open period has elapsed reads as half-open: the
    next admission moves it there. A forced-open circuit is re-checked every
    ``open_ms`` so caches learn of a forced close even if they miss the news.
    """
    if snap.state == OPEN:
        if snap.mode == Mode.FORCED_OPEN:
            return OPEN, w.open_ms
        if now < snap.open_until:
            return OPEN, snap.open_until - now
        return HALF_OPEN, 0
    return snap.state, 0


def admit(snap: Snapshot, w: PolicyWire, now: int, probe_id: str) -> Admission:
    """Decide whether a call may go through; ``probe_id`` names it if it probes."""
    transitions: list[Transition] = []
    if snap.mode == Mode.FORCED_OPEN:
        return Admission(False, None, w.open_ms, ())
    disabled = snap.mode == Mode.DISABLED
    if snap.state == OPEN:
        if now < snap.open_until:
            return Admission(disabled, None, snap.open_until - now, ())
        transitions.append(_half_open(snap, "open period elapsed"))
    if snap.state == HALF_OPEN:
        probes = snap.probes
        for expired in [p for p, lease_end in probes.items() if lease_end <= now]:
            del probes[expired]
        if len(probes) < w.half_open_probes:
            probes[probe_id] = now + w.lease_ms
            return Admission(True, probe_id, 0, tuple(transitions))
        # Every slot taken: come back in about one probe's duration (as long as
        # the oldest probe has run so far, at least MIN_STRAGGLER_WAIT_MS), not
        # a whole period.
        lease_end = min(probes.values())
        running = now - (lease_end - w.lease_ms)
        wait = min(max(running, MIN_STRAGGLER_WAIT_MS), lease_end - now, w.open_ms)
        return Admission(disabled, None, wait, tuple(transitions))
    return Admission(True, None, 0, ())


def record(
    snap: Snapshot,
    w: PolicyWire,
    now: int,
    probe_id: str | None,
    outcome: Outcome,
    slow: bool,
    retry_after_ms: int,
    rand: float,
    failure: str = "",
) -> list[Transition]:
    """Count the outcome of a call admitted earlier (as a probe if ``probe_id``);
    ``failure`` says what a failure was, kept as the last one."""
    if probe_id is not None:
        lease_end = snap.probes.pop(probe_id, None)  # probes exist only while half-open
        if lease_end is None or lease_end <= now:
            return []  # the probe's lease ran out, or other probes decided first
        if outcome == Outcome.IGNORED:
            return []
        if outcome == Outcome.FAILURE and failure:
            snap.last_failure = failure
        if outcome == Outcome.FAILURE or slow:
            reason = "probe failed" if outcome == Outcome.FAILURE else "probe was slow"
            return [_trip(snap, w, now, reason, retry_after_ms, rand)]
        snap.probe_successes += 1
        if snap.probe_successes >= w.half_open_successes:
            return [_close(snap, f"{snap.probe_successes} probe(s) succeeded")]
        return []
    # Outcomes of calls admitted before a trip, or of shadow calls while
    # disabled, say nothing about the endpoint's recovery: not counted.
    if snap.state != CLOSED or outcome == Outcome.IGNORED:
        return []
    failed = outcome == Outcome.FAILURE
    if failed:
        snap.consecutive += 1
        if failure:
            snap.last_failure = failure
        if w.honor_retry_after and retry_after_ms > 0:
            reason = f"endpoint asked to retry after {retry_after_ms} ms"
            return [_trip(snap, w, now, reason, retry_after_ms, rand)]
    elif snap.consecutive:
        snap.consecutive = 0
    if snap.consecutive >= w.failure_threshold:
        reason = f"{snap.consecutive} consecutive failures"
        return [_trip(snap, w, now, reason, retry_after_ms, rand)]
    if w.window_kind:
        _add_to_window(snap, w, now, failed, slow)
        if snap.calls >= w.min_calls:
            if 0 <= w.failure_rate <= snap.failures / snap.calls:
                percent = snap.failures * 100 // snap.calls
                reason = f"failure rate {percent}% over {snap.calls} calls"
                return [_trip(snap, w, now, reason, retry_after_ms, rand)]
            if 0 <= w.slow_rate <= snap.slow / snap.calls:
                percent = snap.slow * 100 // snap.calls
                reason = f"slow-call rate {percent}% over {snap.calls} calls"
                return [_trip(snap, w, now, reason, retry_after_ms, rand)]
    return []


def control(snap: Snapshot, w: PolicyWire, now: int, op: str) -> list[Transition]:
    """Apply a command: force_open, force_close, force_half_open, reset, disable, enable
    (an operator's), or healthy (a health check passed: an open circuit goes half-open now)."""
    before = snap.state
    if op == "healthy":
        # A health check opens the door, only real calls (probes) close it.
        # Never against an operator's forced open; no change, no news.
        if snap.state != OPEN or snap.mode == Mode.FORCED_OPEN:
            return []
        return [_half_open(snap, "health check passed")]
    snap.version += 1
    if op == "force_open":
        snap.mode = Mode.FORCED_OPEN
        snap.state = OPEN
        snap.open_until = now
        snap.probes.clear()
        return [(before, OPEN, "forced open")] if before != OPEN else []
    if op == "disable" and snap.mode == Mode.FORCED_OPEN:
        # The operator lifts the force for shadow mode: it counts from a closed circuit.
        snap.mode = Mode.DISABLED
        return [_close(snap, "disabled by an operator")]
    if op in ("disable", "enable"):
        if snap.mode == Mode.FORCED_OPEN:
            snap.open_until = now  # leave a forced open through a half-open probe
        snap.mode = Mode.DISABLED if op == "disable" else Mode.NORMAL
        return []
    if op == "force_close":
        snap.mode = Mode.NORMAL
        closed = _close(snap, "forced closed")
        return [closed] if before != CLOSED else []
    if op == "force_half_open":
        # Probes decide from here, as after an open period: a test's or an operator's.
        snap.mode = Mode.NORMAL
        snap.state = HALF_OPEN
        snap.open_until = 0
        snap.probes.clear()
        snap.probe_successes = 0
        return [(before, HALF_OPEN, "forced half-open")] if before != HALF_OPEN else []
    if op == "reset":
        version = snap.version
        fresh = Snapshot(version=version)
        for name in Snapshot.__slots__:
            setattr(snap, name, getattr(fresh, name))
        return [(before, CLOSED, "reset")] if before != CLOSED else []
    raise ValueError(f"unknown breaker command {op!r}")


def _trip(
    snap: Snapshot, w: PolicyWire, now: int, reason: str, retry_after_ms: int, rand: float
) -> Transition:
    before = snap.state
    snap.trips += 1
    snap.trips_total += 1
    duration = max(open_duration_ms(w, snap.trips, rand), retry_after_ms)
    snap.state = OPEN
    snap.open_until = now + duration
    snap.probes.clear()
    snap.probe_successes = 0
    snap.consecutive = 0
    _clear_window(snap)
    snap.version += 1
    return (before, OPEN, reason)


def _half_open(snap: Snapshot, reason: str) -> Transition:
    snap.state = HALF_OPEN
    snap.probes.clear()
    snap.probe_successes = 0
    snap.version += 1
    return (OPEN, HALF_OPEN, reason)


def _close(snap: Snapshot, reason: str) -> Transition:
    before = snap.state
    snap.state = CLOSED
    snap.trips = 0
    snap.open_until = 0
    snap.probes.clear()
    snap.probe_successes = 0
    snap.consecutive = 0
    _clear_window(snap)
    snap.version += 1
    return (before, CLOSED, reason)


def _clear_window(snap: Snapshot) -> None:
    snap.calls = snap.failures = snap.slow = 0
    snap.ring = bytearray()
    snap.ring_pos = 0
    snap.buckets = []
    snap.last_epoch = 0


def _add_to_window(snap: Snapshot, w: PolicyWire, now: int, failed: bool, slow: bool) -> None:
    if snap.window_signature != w.window_signature:
        _clear_window(snap)
        snap.window_signature = w.window_signature
    if w.window_kind == 1:
        if not snap.ring:
            snap.ring = bytearray(w.window_size)
        old = snap.ring[snap.ring_pos]
        if old:
            snap.calls -= 1
            snap.failures -= (old & _FAILED) >> 1
            snap.slow -= (old & _SLOW) >> 2
        snap.ring[snap.ring_pos] = _CALL | (_FAILED if failed else 0) | (_SLOW if slow else 0)
        snap.ring_pos = (snap.ring_pos + 1) % w.window_size
    else:
        if not snap.buckets:
            snap.buckets = [[0, 0, 0] for _ in range(w.window_size)]
        epoch = max(now // w.bucket_ms, snap.last_epoch)
        # Empty the buckets the window slid past since the last call.
        for passed in range(max(snap.last_epoch + 1, epoch - w.window_size + 1), epoch + 1):
            bucket = snap.buckets[passed % w.window_size]
            snap.calls -= bucket[0]
            snap.failures -= bucket[1]
            snap.slow -= bucket[2]
            bucket[0] = bucket[1] = bucket[2] = 0
        snap.last_epoch = epoch
        bucket = snap.buckets[epoch % w.window_size]
        bucket[0] += 1
        bucket[1] += failed
        bucket[2] += slow
    snap.calls += 1
    snap.failures += failed
    snap.slow += slow
