"""The limit's arithmetic: no I/O, no clock, no randomness inside.

Every function takes the limiter's state, the limit (as a :class:`LimitWire`)
and the time ``now`` in milliseconds. The MemoryStore runs these under its
lock; ``stores/lua/limit.lua`` is the same arithmetic in Lua, run inside the
breaker's own admit and record scripts on Redis's clock, and the contract and
property tests hold the two to the same answers.

Concurrency: a slot per admitted call, a lease that ends ``lease_ms`` after
the call may start (a dead holder's slot comes back then). A refused call is
told to come back when the oldest call should end (its start plus the
smoothed call duration), or, if that is past, in one call's duration divided
among the slots.

Rate: GCRA, the generic cell rate algorithm. ``rate_tat`` is the theoretical
arrival time of the next call; a call may start ``burst_ms`` ahead of it. A
call that may wait (``wait_ms``) takes the first free moment and is told how
long to sleep first: callers queue on the clock, not on Redis.

Tokens: GCRA again, each token worth ``token_ms``, a call costing its
estimate; settling moves the arrival time by what the call really used.

Adaptive concurrency: the limit (a float, its floor the slots) moves with the
endpoint's answers, fleet-wide, at each recorded call:

- "overloaded" (429, a full queue's 503): cut by ``OVERLOAD_BACKOFF``, at
  most once per call duration (the calls admitted under the old limit all
  meet the same full queue, and are one signal). At the minimum, overload
  counts toward opening the circuit: the endpoint is failing, not busy.
- latency: the smoothed latency (an EWMA over about ten calls) against the
  no-load latency, the least smoothed latency seen, drifting up by
  ``NOLOAD_DRIFT`` a second so that a slower model (a rolling deploy) is
  learnt. Past ``tolerance`` times the no-load latency the limit is cut in
  proportion (never by more than ``OVERLOAD_BACKOFF``), at most once per call
  duration.
- growth: while calls come back within the tolerance and the limit is full
  (in flight at its floor, less one), each success adds ``GROWTH / limit``:
  ``GROWTH`` slots per round of calls, as TCP's congestion avoidance grows
  its window by one per round trip, slower here because the whole fleet
  reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._limit import CONCURRENCY, RATE, TOKENS, LimitWire

__all__ = [
    "GROWTH",
    "LATENCY_SMOOTHING",
    "MIN_WAIT_MS",
    "OVERLOAD_BACKOFF",
    "PROBE_CALLS",
    "PROBE_INTERVAL_MS",
    "LimiterState",
    "acquire",
    "observe",
    "release",
]

#: Outcome codes, as the stores pass them (cbtasks._state.Outcome).
_SUCCESS, _OVERLOAD = 0, 3

#: A refused call waits at least this long before asking again (ms).
MIN_WAIT_MS = 5.0
#: Without a measured call duration, a refused call comes back after this (ms).
UNKNOWN_DURATION_MS = 100.0
#: The adaptive limit is multiplied by this on "overloaded" (and at most by this on latency).
OVERLOAD_BACKOFF = 0.8
#: The adaptive limit is multiplied by at least this when latency is past the tolerance.
LATENCY_BACKOFF = 0.5
#: Slots the adaptive limit grows by per round of successful calls at a full limit.
GROWTH = 0.2
#: The no-load latency is measured again this often (ms), at half the limit ...
PROBE_INTERVAL_MS = 30_000.0
#: ... from this many calls.
PROBE_CALLS = 10
#: The weight of each new latency in the smoothed latency (about ten calls).
LATENCY_SMOOTHING = 0.1
#: Successes between two cuts of the adaptive limit: the smoothing's memory.
SMOOTHING_CALLS = 10


@dataclass(slots=True)
class LimiterState:
    """What a store keeps of one breaker's limit (in Redis: fields of its state hash)."""

    #: Slot id -> the end of its lease (ms).
    slots: dict[str, float] = field(default_factory=dict)
    rate_tat: float = 0.0
    token_tat: float = 0.0
    #: The adaptive limit now (0: not started yet).
    limit: float = 0.0
    #: The smoothed call duration (ms; 0: none measured yet).
    latency: float = 0.0
    #: The adaptive limit's no-load latency (ms; 0: not measured yet).
    noload: float = 0.0
    #: When the adaptive limit was last cut, and the successes recorded since.
    cut_at: float = 0.0
    since_cut: int = 0
    #: A re-measure of the no-load latency: when it began (0: none running),
    #: the calls it has timed and their total, and when the next one begins.
    probe_from: float = 0.0
    probe_calls: int = 0
    probe_sum: float = 0.0
    probe_next: float = 0.0
    #: Calls admitted in the whole second ``second`` (epoch seconds) and the one before.
    second: int = 0
    this_second: int = 0
    last_second: int = 0


@dataclass(frozen=True, slots=True)
class Acquired:
    """The limit's answer: refused by which part (0: admitted), for how long, or a delay."""

    refused_by: int
    retry_after_ms: float
    #: Admitted, but start only this many ms from now (a rate or token permit reserved ahead).
    delay_ms: float


def capacity(st: LimiterState, w: LimitWire) -> int:
    """How many calls may be in flight now (0: no concurrency limit)."""
    if not w.adaptive:
        return w.concurrency
    limit = math.floor(st.limit or w.start)
    # While the no-load latency is re-measured, half the limit: no queue at the endpoint.
    return max(w.min_concurrency, limit // 2) if st.probe_from else limit


def expire_slots(st: LimiterState, now: float) -> None:
    """Drop the slots whose lease has ended (their holders died, or overran the lease)."""
    for slot in [s for s, end in st.slots.items() if end <= now]:
        del st.slots[slot]


def acquire(
    st: LimiterState, w: LimitWire, now: float, slot_id: str, tokens: int, wait_ms: float
) -> Acquired:
    """Take a slot, a rate permit and ``tokens``, all or none."""
    cap = capacity(st, w)
    if cap and len(st.slots) >= cap:
        # Dead holders' slots (their leases run out) are dropped when the count says
        # full: expired when it matters, not at every call (one command less in Lua).
        expire_slots(st, now)
        if len(st.slots) >= cap:
            return Acquired(CONCURRENCY, _slot_wait(st, w, now, cap), 0.0)
    delay = 0.0
    rate_tat = token_tat = 0.0
    if w.rate_ms:
        rate_tat = max(st.rate_tat, now)
        start = rate_tat - w.burst_ms
        if start - now > wait_ms:
            return Acquired(RATE, start - now, 0.0)
        delay = max(delay, start - now)
    if w.token_ms and tokens > 0:
        cost = min(tokens, w.token_burst_ms / w.token_ms) * w.token_ms
        token_tat = max(st.token_tat, now) + cost
        start = token_tat - w.token_burst_ms
        if start - now > wait_ms:
            return Acquired(TOKENS, start - now, 0.0)
        delay = max(delay, start - now)
    if cap:
        st.slots[slot_id] = now + delay + w.lease_ms
    if w.rate_ms:
        st.rate_tat = rate_tat + w.rate_ms
    if w.token_ms and tokens > 0:
        st.token_tat = token_tat
    second = math.floor(now / 1000)
    if st.second != second:
        st.last_second = st.this_second if st.second == second - 1 else 0
        st.this_second, st.second = 0, second
    st.this_second += 1
    return Acquired(0, 0.0, delay)


def observe(st: LimiterState, w: LimitWire, now: float) -> tuple[int, float, int, int]:
    """For operators: in flight, the concurrency limit now (0: none), calls admitted
    in the last whole second, tokens available now (0 without a budget)."""
    in_flight = sum(1 for end in st.slots.values() if end > now)
    second = math.floor(now / 1000)
    if st.second == second:
        last = st.last_second
    else:
        last = st.this_second if st.second == second - 1 else 0
    tokens = 0
    if w.token_ms:
        # (a hair of slack: 8699.9999 tokens, the float error of times near 1.8e12 ms, are 8700)
        tokens = math.floor((w.token_burst_ms - max(0.0, st.token_tat - now)) / w.token_ms + 1e-3)
    concurrency = (st.limit or float(w.start)) if w.adaptive else float(w.concurrency)
    return in_flight, concurrency, last, tokens


def _slot_wait(st: LimiterState, w: LimitWire, now: float, cap: int) -> float:
    """When a slot is likely free: the oldest call's expected end, else a share of a call."""
    duration = st.latency or UNKNOWN_DURATION_MS
    oldest_start = min(st.slots.values()) - w.lease_ms
    wait = oldest_start + duration - now
    if wait < MIN_WAIT_MS:
        wait = duration / cap
    return min(max(wait, MIN_WAIT_MS), float(w.lease_ms))


def release(
    st: LimiterState,
    w: LimitWire,
    now: float,
    slot_id: str,
    reserved: int,
    used: int,
    latency_ms: float,
    outcome: int,
) -> bool:
    """Give back what a call held and learn from how it went.

    ``used`` is the tokens it really used (negative: unknown, the estimate
    stands), ``latency_ms`` how long it took (negative: not timed). Returns
    whether an "overloaded" answer counts toward opening the circuit: always
    without an adaptive limit, and with one only at its minimum.
    """
    in_flight = len(st.slots)
    st.slots.pop(slot_id, None)
    if w.token_ms and used >= 0 and reserved > 0 and used != reserved:
        st.token_tat += (used - min(reserved, w.token_burst_ms / w.token_ms)) * w.token_ms
    if outcome == _SUCCESS and latency_ms >= 0:
        st.latency = (
            latency_ms
            if st.latency <= 0
            else (st.latency + LATENCY_SMOOTHING * (latency_ms - st.latency))
        )
    if not w.adaptive:
        return outcome == _OVERLOAD
    return _adapt(st, w, now, outcome, latency_ms, in_flight)


def _adapt(
    st: LimiterState, w: LimitWire, now: float, outcome: int, latency_ms: float, in_flight: int
) -> bool:
    if st.limit <= 0:
        st.limit = float(w.start)
    # One cut per queue: the calls admitted under the old limit meet the same full
    # queue (or the same slow answers) and are one signal, not many.
    cooled = now >= st.cut_at + st.latency
    if outcome == _OVERLOAD:
        if st.limit <= w.min_concurrency:
            return True
        if cooled:
            _cut(st, now, OVERLOAD_BACKOFF, w)
        return False
    if outcome != _SUCCESS or latency_ms < 0:
        return False
    st.since_cut += 1
    if st.probe_from:
        # Re-measuring the no-load latency at half the limit: only calls that
        # started after the probe began say what an unqueued call takes.
        if now - latency_ms >= st.probe_from:
            st.probe_calls += 1
            st.probe_sum += latency_ms
            if st.probe_calls >= PROBE_CALLS:
                st.noload = st.probe_sum / st.probe_calls
                st.probe_from = 0.0
                st.probe_next = now + PROBE_INTERVAL_MS
        return False
    if now >= st.probe_next:
        st.probe_from, st.probe_calls, st.probe_sum = now, 0, 0.0
        return False
    st.noload = min(st.noload, st.latency)
    if st.latency > w.tolerance * st.noload:
        # The smoothed latency must have seen the calls admitted since the last cut.
        if cooled and st.since_cut >= SMOOTHING_CALLS:
            _cut(st, now, max(LATENCY_BACKOFF, st.noload / st.latency), w)
    elif in_flight >= math.floor(st.limit) - 1:
        st.limit = min(float(w.max_concurrency), st.limit + GROWTH / st.limit)
    return False


def _cut(st: LimiterState, now: float, factor: float, w: LimitWire) -> None:
    st.limit = max(float(w.min_concurrency), st.limit * factor)
    st.cut_at = now
    st.since_cut = 0
