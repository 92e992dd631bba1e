"""A simulated endpoint of known capacity and the callers of a fleet, on a virtual clock.

The adaptive limit's rule (``cbtasks._limiter``) is pure: this drives it with
an endpoint that serves ``capacity`` calls at once, queues ``queue`` more
(their wait grows with the queue) and answers "overloaded" beyond, as TGI
and Triton do, and ``callers`` processes that each take a call, ask the
limit, call, and record. No sockets, no sleeps: a minute runs in a second.
The tests assert the rule converges and follows a change of capacity; the
bench ``bench/adaptive.py --model`` prints the figures behind its constants.
"""

from __future__ import annotations

import heapq
import random
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import _limiter
from .._limit import Limit

__all__ = ["Run", "simulate"]

_SUCCESS, _OVERLOAD = 0, 3


@dataclass
class Run:
    """What a simulated run saw: one row per answered call, and the limit after each."""

    service_ms: float
    #: (time ms, status 200 or 429, latency ms, the overload counted as a failure)
    answers: list[tuple[float, int, float, bool]] = field(default_factory=list)
    #: (time ms, the adaptive limit)
    limits: list[tuple[float, float]] = field(default_factory=list)

    def window(self, start_s: float, end_s: float, capacity: int) -> dict[str, float]:
        """Goodput (as a fraction of ``capacity`` calls per service time), overload
        share, p99 latency (as a multiple of the service time), the limit's mean."""
        start, end = start_s * 1000, end_s * 1000
        rows = [a for a in self.answers if start <= a[0] < end]
        good = [a for a in rows if a[1] == 200]
        latencies = sorted(a[2] for a in good)
        p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)] if latencies else 0.0
        limits = [v for t, v in self.limits if start <= t < end] or [0.0]
        best = capacity * 1000 / self.service_ms * (end_s - start_s)
        return {
            "goodput": len(good) / best,
            "overload": (len(rows) - len(good)) / max(1, len(rows)),
            "p99": p99 / self.service_ms,
            "limit": statistics.mean(limits),
            "opened": float(sum(1 for a in rows if a[3])),
        }


def simulate(
    limit: Limit,
    *,
    callers: int = 16,
    capacity: int = 4,
    queue: int = 4,
    service_ms: float = 40.0,
    seconds: float = 60.0,
    changes: Sequence[tuple[float, int]] = (),
    seed: int = 1,
) -> Run:
    """Run ``callers`` against the endpoint for ``seconds``; ``changes`` sets the
    capacity to N from second T: ``[(30, 2), (60, 4)]`` halves it, then restores it."""
    rng = random.Random(seed)
    wire = limit.wire()
    state = _limiter.LimiterState()
    run = Run(service_ms)
    events: list[tuple[float, int, str, tuple[Any, ...]]] = []
    order = iter(range(1 << 62))
    serving: set[str] = set()
    waiting: deque[tuple[str, float]] = deque()
    now = 0.0

    def at(when: float, kind: str, *data: Any) -> None:
        heapq.heappush(events, (when, next(order), kind, data))

    def capacity_at(ms: float) -> int:
        current = capacity
        for second, value in changes:
            if ms >= second * 1000:
                current = value
        return current

    def serve(call: str, sent: float) -> None:
        serving.add(call)
        at(now + service_ms * rng.uniform(0.9, 1.1), "served", call, sent)

    for caller in range(callers):
        at(rng.uniform(0, 5), "ask", caller)
    while events:
        now, _, kind, data = heapq.heappop(events)
        if now > seconds * 1000:
            break
        if kind == "ask":
            (caller,) = data
            call = f"{caller}:{now}"
            taken = _limiter.acquire(state, wire, now, call, 0, 0.0)
            if taken.refused_by:  # a paused worker's process waits, then asks again
                at(now + taken.retry_after_ms * rng.uniform(1.0, 1.5), "ask", caller)
            else:
                at(now + 0.5, "arrive", caller, call)
        elif kind == "arrive":
            caller, call = data
            if len(serving) < capacity_at(now):
                serve(call, now)
            elif len(waiting) < queue:
                waiting.append((call, now))
            else:  # the queue is full: "Model is overloaded", at once
                at(now + 1.0, "answer", call, now, 429)
        elif kind == "served":
            call, sent = data
            serving.discard(call)
            at(now + 0.5, "answer", call, sent, 200)
            while waiting and len(serving) < capacity_at(now):
                serve(*waiting.popleft())
        elif kind == "answer":
            call, sent, status = data
            latency = now - sent + 0.5
            outcome = _SUCCESS if status == 200 else _OVERLOAD
            counted = _limiter.release(state, wire, now, call, 0, -1, latency, outcome)
            run.answers.append((now, status, latency, counted))
            run.limits.append((now, state.limit))
            at(now + 1.0, "ask", int(call.split(":")[0]))
    return run
