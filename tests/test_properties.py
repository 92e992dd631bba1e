"""Random runs of outcomes and time steps: both stores against a reference model.

The reference is written from the policy's description alone, in the plainest
way (a list of every call, no ring, no buckets), so that an optimisation in
the machine or the Lua script that changes behaviour shows up as a difference.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbtasks import BreakerPolicy, CountWindow, MemoryStore, Outcome, RedisStore, TimeWindow
from cbtasks._policy import TIME_WINDOW_BUCKETS, PolicyWire
from cbtasks.stores._base import CallResult, Reply
from tests.conftest import FakeClock

_names = itertools.count()

# `make mutate` runs these once per mutant: fewer examples there keep it to minutes.
EXAMPLES = 50 if os.environ.get("CBTASKS_MUTATION") else 1000


@dataclass
class Reference:
    """The policy, said as directly as possible."""

    p: PolicyWire
    state: str = "closed"
    forced: bool = False
    disabled: bool = False
    open_until: int = 0
    trips: int = 0
    consecutive: int = 0
    calls: list[tuple[int, bool, bool]] = field(default_factory=list)  # (time, failed, slow)
    probes: dict[str, int] = field(default_factory=dict)
    probe_successes: int = 0

    def admit(self, now: int, probe_id: str) -> tuple[bool, bool, int]:
        if self.forced:
            return False, False, self.p.open_ms
        if self.state == "open":
            if now < self.open_until:
                return self.disabled, False, self.open_until - now
            self.state, self.probes, self.probe_successes = "half_open", {}, 0
        if self.state == "half_open":
            self.probes = {k: v for k, v in self.probes.items() if v > now}
            if len(self.probes) < self.p.half_open_probes:
                self.probes[probe_id] = now + self.p.lease_ms
                return True, True, 0
            # Full: about one probe's duration so far (at least 100 ms), within the lease.
            lease_end = min(self.probes.values())
            running = now - (lease_end - self.p.lease_ms)
            return self.disabled, False, min(max(running, 100), lease_end - now, self.p.open_ms)
        return True, False, 0

    def record(
        self, now: int, probe_id: str | None, outcome: Outcome, slow: bool, retry_ms: int
    ) -> None:
        if probe_id is not None:
            lease = self.probes.pop(probe_id, None) if self.state == "half_open" else None
            if lease is None or lease <= now or outcome == Outcome.IGNORED:
                return
            if outcome == Outcome.FAILURE or slow:
                self.trip(now, retry_ms)
            else:
                self.probe_successes += 1
                if self.probe_successes >= self.p.half_open_successes:
                    self.close()
            return
        if self.state != "closed" or outcome == Outcome.IGNORED:
            return
        failed = outcome == Outcome.FAILURE
        self.consecutive = self.consecutive + 1 if failed else 0
        if failed and self.p.honor_retry_after and retry_ms > 0:
            return self.trip(now, retry_ms)
        if self.consecutive >= self.p.failure_threshold:
            return self.trip(now, retry_ms)
        if not self.p.window_kind:
            return
        self.calls.append((now, failed, slow))
        if self.p.window_kind == 1:
            window = self.calls[-self.p.window_size :]
        else:
            latest = max(t // self.p.bucket_ms for t, _, _ in self.calls)
            window = [
                c for c in self.calls if c[0] // self.p.bucket_ms > latest - TIME_WINDOW_BUCKETS
            ]
        n = len(window)
        if n < self.p.min_calls:
            return
        failures = sum(1 for c in window if c[1])
        slows = sum(1 for c in window if c[2])
        if (self.p.failure_rate >= 0 and failures / n >= self.p.failure_rate) or (
            self.p.slow_rate >= 0 and slows / n >= self.p.slow_rate
        ):
            self.trip(now, retry_ms)

    def trip(self, now: int, retry_ms: int) -> None:
        self.trips += 1
        duration = self.p.open_ms * self.p.backoff_factor ** (self.trips - 1)
        duration = math.floor(min(duration, self.p.max_open_ms))
        self.state, self.open_until = "open", now + max(duration, retry_ms)
        self.consecutive, self.calls, self.probes, self.probe_successes = 0, [], {}, 0

    def close(self) -> None:
        self.state, self.trips, self.consecutive, self.calls = "closed", 0, 0, []
        self.probes, self.probe_successes = {}, 0

    def control(self, now: int, op: str) -> None:
        if op == "force_open":
            self.forced, self.disabled, self.state, self.open_until = True, False, "open", now
            self.probes = {}
        elif op == "force_close":
            self.forced = self.disabled = False
            self.close()
        elif op == "disable":
            if self.forced:  # shadow mode after a forced open starts closed
                self.close()
            self.forced, self.disabled = False, True

    def observed(self, now: int) -> str:
        if self.state == "open" and not self.forced and now >= self.open_until:
            return "half_open"
        return self.state


policies = st.builds(
    BreakerPolicy,
    failure_threshold=st.integers(1, 8),
    failure_rate=st.none() | st.sampled_from([0.25, 0.5, 1.0]),
    slow_call_seconds=st.none() | st.just(1.0),
    window=st.builds(CountWindow, calls=st.integers(3, 6))
    | st.builds(TimeWindow, seconds=st.sampled_from([1.0, 5.0])),
    min_calls=st.integers(1, 3),
    open_seconds=st.sampled_from([0.5, 1.0, 2.0]),
    backoff_factor=st.sampled_from([1.0, 2.0, 1.5]),
    max_open_seconds=st.just(5.0),
    half_open_probes=st.integers(1, 3),
    half_open_successes=st.integers(1, 3),
    probe_lease_seconds=st.sampled_from([0.5, 3.0]),
    honor_retry_after=st.booleans(),
)

_admit = st.tuples(st.just("admit"))
_record = st.tuples(
    st.just("record"),
    st.integers(0, 10),  # which outstanding call
    st.sampled_from([Outcome.SUCCESS, Outcome.FAILURE, Outcome.FAILURE, Outcome.IGNORED]),
    st.booleans(),  # slow
    st.sampled_from([0, 0, 0, 0, 0, 3000]),  # retry-after ms
)
_wait = st.tuples(st.just("wait"), st.sampled_from([1, 40, 150, 400, 999, 1000, 2500]))
_control = st.tuples(st.just("control"), st.sampled_from(["force_open", "force_close", "disable"]))
# Mostly calls and time; operator commands are rare, as in life (a forced-open
# breaker rejects everything, which would hide the interesting paths).
steps = st.lists(
    st.one_of(_admit, _record, _admit, _record, _wait, _admit, _record, _wait, _control),
    min_size=20,
    max_size=80,
)


def run(policy: BreakerPolicy, script: list[tuple[object, ...]], stores: list[object]) -> None:
    """Play ``script`` on the reference and on each store; stop at the first difference."""
    wire = policy.wire()
    clock = FakeClock()
    for store in stores:
        store.local_clock = clock  # type: ignore[attr-defined]
        if isinstance(store, RedisStore):
            store._fake_clock = clock
    ref = Reference(wire)
    name = f"prop-{next(_names)}"
    outstanding: list[tuple[str | None]] = []
    probe_ids = itertools.count()
    for step in script:
        now = clock.now_ms
        if step[0] == "admit":
            probe_id = f"p{next(probe_ids)}"
            expected = ref.admit(now, probe_id)
            for store in stores:
                reply: Reply = store.admit(name, wire, probe_id)  # type: ignore[attr-defined]
                got = (reply.admitted, reply.probe_id is not None, reply.retry_after_ms)
                assert got == expected, (
                    f"{type(store).__name__} admit at {now}: {got} != {expected}"
                )
            if expected[0]:
                outstanding.append((probe_id if expected[1] else None,))
        elif step[0] == "record" and outstanding:
            _, index, outcome, slow, retry_ms = step
            (probe_id,) = outstanding.pop(int(index) % len(outstanding))  # type: ignore[call-overload]
            slow = bool(slow) and policy.slow_call_seconds is not None
            ref.record(now, probe_id, outcome, slow, retry_ms)  # type: ignore[arg-type]
            for store in stores:
                store.record(name, wire, CallResult(probe_id, outcome, slow, retry_ms))  # type: ignore[attr-defined]
        elif step[0] == "wait":
            clock.advance(int(step[1]) / 1000)  # type: ignore[call-overload]
        elif step[0] == "control":
            ref.control(now, str(step[1]))
            for store in stores:
                store.control(name, wire, str(step[1]))  # type: ignore[attr-defined]
        expected_state = ref.observed(clock.now_ms)
        for store in stores:
            status = store.status(name, wire)  # type: ignore[attr-defined]
            got_state = "closed" if status is None else status.state.value
            assert got_state == expected_state, f"{type(store).__name__} after {step}"


@settings(max_examples=EXAMPLES, deadline=None)
@given(policy=policies, script=steps)
def test_memory_store_matches_the_reference(policy: BreakerPolicy, script: list) -> None:  # type: ignore[type-arg]
    """The Python machine behaves as the plain reading of the policy."""
    run(policy, script, [MemoryStore()])


@pytest.fixture(scope="module")
def shared_redis_store(redis_server):  # type: ignore[no-untyped-def]
    store = RedisStore(redis_server.url)
    yield store
    store.close()


@settings(
    max_examples=EXAMPLES // 5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(policy=policies, script=steps)
def test_redis_store_matches_the_reference(
    shared_redis_store: RedisStore,
    policy: BreakerPolicy,
    script: list,  # type: ignore[type-arg]
) -> None:
    """The Lua machine behaves as the plain reading of the policy, in lockstep with Python."""
    run(policy, script, [MemoryStore(), shared_redis_store])
