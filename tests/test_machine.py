"""The pure machine and the policy, step by step: what the contract suite cannot see at once.

The windows' counts against a plain reference over random call sequences,
the reasons and percentages a trip gives, the edges of each policy bound, and
the wording of the errors that tell a user what to change.
"""

from __future__ import annotations

import random
from collections import deque

import pytest

from cbtasks import BreakerPolicy, CircuitBreaker, CountWindow, PolicyError, TimeWindow
from cbtasks import _machine as machine
from cbtasks._policy import with_shorthand
from cbtasks._state import Mode, Outcome

T0 = 1_800_000_000_000  # ms


def record(
    snap: machine.Snapshot, policy: BreakerPolicy, now: int, outcome: Outcome, slow: bool = False
) -> list[machine.Transition]:
    return machine.record(snap, policy.wire(), now, None, outcome, slow, 0, 0.0)


@pytest.mark.parametrize("seed", range(6))
def test_a_count_window_counts_exactly_the_last_n_calls(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.randint(1, 7)
    # Thresholds out of reach: only the counting is under test.
    # The machine's thresholds are not under test here: only the counting.
    policy = BreakerPolicy(
        window=CountWindow(calls=size),
        min_calls=1,
        failure_rate=1.0,
        slow_call_seconds=1.0,
        slow_call_rate=1.0,
    )
    wire = policy.wire()
    snap = machine.Snapshot()
    last: deque[tuple[bool, bool]] = deque(maxlen=size)
    for _ in range(60):
        failed, slow = rng.random() < 0.4, rng.random() < 0.4
        machine._add_to_window(snap, wire, T0, failed, slow)
        last.append((failed, slow))
        assert (snap.calls, snap.failures, snap.slow) == (
            len(last),
            sum(f for f, _ in last),
            sum(s for _, s in last),
        )


@pytest.mark.parametrize("seed", range(6))
def test_a_time_window_counts_exactly_the_calls_of_its_buckets(seed: int) -> None:
    rng = random.Random(seed)
    policy = BreakerPolicy(
        window=TimeWindow(seconds=rng.choice([1, 2, 5])),
        failure_rate=1.0,
        slow_call_seconds=1.0,
        slow_call_rate=1.0,
    )
    wire = policy.wire()
    snap = machine.Snapshot()
    calls: list[tuple[int, bool, bool]] = []
    now = T0 + rng.randint(0, 10_000)
    for _ in range(150):
        now += rng.choice(
            [
                0,
                1,
                7,
                wire.bucket_ms // 2,
                wire.bucket_ms,
                wire.bucket_ms * 3,
                wire.bucket_ms * wire.window_size,
                wire.bucket_ms * (wire.window_size + 2),
            ]
        )
        failed, slow = rng.random() < 0.3, rng.random() < 0.3
        machine._add_to_window(snap, wire, now, failed, slow)
        calls.append((now // wire.bucket_ms, failed, slow))
        epoch = now // wire.bucket_ms
        live = [(f, s) for e, f, s in calls if epoch - wire.window_size < e <= epoch]
        assert (snap.calls, snap.failures, snap.slow) == (
            len(live),
            sum(f for f, _ in live),
            sum(s for _, s in live),
        )


def test_a_window_starts_over_when_the_policy_changes_it() -> None:
    snap = machine.Snapshot()
    five = BreakerPolicy(window=CountWindow(calls=5), min_calls=1, failure_rate=1.0).wire()
    for _ in range(3):
        machine._add_to_window(snap, five, T0, True, False)
    assert (snap.calls, snap.failures) == (3, 3)
    machine._add_to_window(snap, five, T0, False, False)
    assert (snap.calls, snap.failures) == (4, 3)  # the same window goes on
    ten = BreakerPolicy(window=CountWindow(calls=10), min_calls=1, failure_rate=1.0).wire()
    machine._add_to_window(snap, ten, T0, False, False)
    assert (snap.calls, snap.failures) == (1, 0)  # a new window


def test_rate_trips_give_the_rate_rounded_down() -> None:
    """2 failures of 3 are 66% (not 67%): the same words as the Lua machine."""
    policy = BreakerPolicy(
        failure_threshold=100, window=CountWindow(calls=3), min_calls=3, failure_rate=0.6
    )
    snap = machine.Snapshot()
    assert record(snap, policy, T0, Outcome.FAILURE) == []
    assert record(snap, policy, T0, Outcome.SUCCESS) == []
    assert record(snap, policy, T0, Outcome.FAILURE) == [
        (machine.CLOSED, machine.OPEN, "failure rate 66% over 3 calls")
    ]
    slow_policy = BreakerPolicy(
        window=CountWindow(calls=3), min_calls=3, slow_call_seconds=1.0, slow_call_rate=0.6
    )
    snap = machine.Snapshot()
    assert record(snap, slow_policy, T0, Outcome.SUCCESS, slow=True) == []
    assert record(snap, slow_policy, T0, Outcome.SUCCESS) == []
    assert record(snap, slow_policy, T0, Outcome.SUCCESS, slow=True) == [
        (machine.CLOSED, machine.OPEN, "slow-call rate 66% over 3 calls")
    ]


def test_a_slow_call_rate_under_its_threshold_does_not_trip() -> None:
    policy = BreakerPolicy(
        window=CountWindow(calls=4), min_calls=4, slow_call_seconds=1.0, slow_call_rate=0.5
    )
    snap = machine.Snapshot()
    for slow in (True, False, False, False, False):
        assert record(snap, policy, T0, Outcome.SUCCESS, slow=slow) == []


def test_without_a_failure_rate_a_window_of_failures_does_not_trip_on_rate() -> None:
    """A window set for the slow-call rate alone: failures count only consecutively."""
    policy = BreakerPolicy(
        failure_threshold=100,
        window=CountWindow(calls=4),
        min_calls=4,
        slow_call_seconds=1.0,
        slow_call_rate=1.0,
    )
    snap = machine.Snapshot()
    for _ in range(10):
        assert record(snap, policy, T0, Outcome.FAILURE) == []


def test_without_a_slow_call_rate_slow_calls_never_trip_on_rate() -> None:
    """Slow calls are counted (for a probe's verdict) but trip nothing without a rate."""
    policy = BreakerPolicy(
        window=CountWindow(calls=4), min_calls=4, failure_rate=0.5, slow_call_seconds=1.0
    )
    snap = machine.Snapshot()
    for _ in range(10):
        assert record(snap, policy, T0, Outcome.SUCCESS, slow=True) == []


def test_a_slow_probe_reopens_and_says_so() -> None:
    policy = BreakerPolicy(failure_threshold=1, open_seconds=1, slow_call_seconds=1.0)
    wire = policy.wire()
    snap = machine.Snapshot()
    record(snap, policy, T0, Outcome.FAILURE)
    admission = machine.admit(snap, wire, T0 + 1000, "p1")
    assert admission.probe_id == "p1"
    assert machine.record(snap, wire, T0 + 1100, "p1", Outcome.SUCCESS, True, 0, 0.0) == [
        (machine.HALF_OPEN, machine.OPEN, "probe was slow")
    ]
    admission = machine.admit(snap, wire, T0 + 3000, "p2")
    assert machine.record(snap, wire, T0 + 3100, "p2", Outcome.FAILURE, False, 0, 0.0) == [
        (machine.HALF_OPEN, machine.OPEN, "probe failed")
    ]


def test_shadow_mode_admits_into_an_open_circuit_without_transitions() -> None:
    policy = BreakerPolicy(failure_threshold=1, open_seconds=10)
    wire = policy.wire()
    snap = machine.Snapshot()
    record(snap, policy, T0, Outcome.FAILURE)
    machine.control(snap, wire, T0, "disable")
    assert machine.admit(snap, wire, T0 + 1, "p") == machine.Admission(True, None, 9_999, ())


def test_remaining_time_is_zero_unless_open() -> None:
    policy = BreakerPolicy(failure_threshold=1, open_seconds=1)
    wire = policy.wire()
    snap = machine.Snapshot()
    assert machine.observe(snap, T0, wire) == (machine.CLOSED, 0)
    record(snap, policy, T0, Outcome.FAILURE)
    assert machine.observe(snap, T0 + 400, wire) == (machine.OPEN, 600)
    assert machine.observe(snap, T0 + 1000, wire) == (machine.HALF_OPEN, 0)
    machine.admit(snap, wire, T0 + 1000, "p")
    assert machine.observe(snap, T0 + 1001, wire) == (machine.HALF_OPEN, 0)


def test_an_unknown_command_is_named() -> None:
    with pytest.raises(ValueError, match="unknown breaker command 'explode'"):
        machine.control(machine.Snapshot(), BreakerPolicy().wire(), T0, "explode")


def test_forced_close_reports_itself() -> None:
    wire = BreakerPolicy().wire()
    snap = machine.Snapshot()
    machine.control(snap, wire, T0, "force_open")
    assert machine.control(snap, wire, T0, "force_close") == [
        (machine.OPEN, machine.CLOSED, "forced closed")
    ]
    assert snap.mode == Mode.NORMAL


# -- the policy ------------------------------------------------------------------


def test_the_policy_bounds_are_exact() -> None:
    BreakerPolicy(backoff_factor=100)
    with pytest.raises(PolicyError, match="^backoff_factor must be"):
        BreakerPolicy(backoff_factor=100.5)
    BreakerPolicy(half_open_probes=10_000, half_open_successes=10_000)
    for field in ("half_open_probes", "half_open_successes"):
        with pytest.raises(PolicyError, match=f"^{field} must be"):
            BreakerPolicy(**{field: 10_001})  # type: ignore[arg-type]
    assert BreakerPolicy(open_seconds=0.001, max_open_seconds=0.5).max_open_seconds == 0.5


def test_the_shortest_period_is_one_millisecond_on_the_wire() -> None:
    assert BreakerPolicy(open_seconds=0.001).wire().open_ms == 1


def test_a_window_too_small_for_min_calls_says_what_to_change() -> None:
    with pytest.raises(PolicyError, match="never be checked: lower min_calls or widen the window$"):
        BreakerPolicy(window=CountWindow(calls=5), min_calls=10)


def test_the_shorthands_are_checked_by_their_own_names() -> None:
    with pytest.raises(PolicyError, match="^policy must be a BreakerPolicy, got 'strict'"):
        CircuitBreaker(policy="strict")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="^reset_timeout must be") as bad:
        CircuitBreaker(reset_timeout=-1)
    assert "open_seconds" not in str(bad.value)
    with pytest.raises(PolicyError, match="reset_timeout"):
        CircuitBreaker(reset_timeout="10")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="^fail_max must be") as bad:
        CircuitBreaker(fail_max=0)
    assert "failure_threshold" not in str(bad.value)
    policy = BreakerPolicy()
    assert with_shorthand(policy, None, None) is policy
