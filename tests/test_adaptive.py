"""The adaptive limit: the pure rule on an injected clock, a simulated endpoint, the stores."""

from __future__ import annotations

import math
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbtasks import BreakerPolicy, CircuitBreaker, Limit, LimitExceeded, Outcome, State, Store
from cbtasks import _limiter as rule
from cbtasks._testing.capacity_model import simulate
from tests.conftest import FakeClock

SUCCESS, OVERLOAD = int(Outcome.SUCCESS), int(Outcome.OVERLOAD)
ADAPTIVE = Limit(adaptive=True, min_concurrency=1, max_concurrency=64)


def measured(state: rule.LimiterState, noload: float = 40.0) -> rule.LimiterState:
    """A state past its first no-load measurement, its next far away."""
    state.noload, state.latency, state.probe_next = noload, noload, 1e12
    state.since_cut = rule.SMOOTHING_CALLS
    return state


# -- the rule, pure -----------------------------------------------------------------------


def test_overload_cuts_the_limit_and_is_not_a_failure() -> None:
    """Above the minimum, "overloaded" shrinks the limit by OVERLOAD_BACKOFF and counts not."""
    wire = Limit(adaptive=True, concurrency=10, max_concurrency=64).wire()
    state = measured(rule.LimiterState(limit=10.0))
    assert rule.release(state, wire, 1000.0, "a", 0, -1, 5.0, OVERLOAD) is False
    assert state.limit == pytest.approx(10 * rule.OVERLOAD_BACKOFF)


def test_overloads_of_one_queue_cut_once() -> None:
    """The calls admitted under the old limit all meet the same full queue: one signal."""
    wire = ADAPTIVE.wire()
    state = measured(rule.LimiterState(limit=10.0))
    for i in range(5):
        rule.release(state, wire, 1000.0 + i, f"c{i}", 0, -1, 5.0, OVERLOAD)
    assert state.limit == pytest.approx(8.0)


def test_overload_at_the_minimum_counts_toward_opening() -> None:
    """At min_concurrency the endpoint is failing, not busy."""
    wire = Limit(adaptive=True, min_concurrency=2).wire()
    state = measured(rule.LimiterState(limit=2.0))
    assert rule.release(state, wire, 1000.0, "a", 0, -1, 5.0, OVERLOAD) is True
    assert state.limit == 2.0


def test_latency_past_the_tolerance_cuts_in_proportion() -> None:
    """Twice the no-load latency (tolerance 1.25): the limit is halved toward the knee."""
    wire = ADAPTIVE.wire()
    state = measured(rule.LimiterState(limit=8.0), noload=40.0)
    state.latency = 80.0
    rule.release(state, wire, 1000.0, "a", 0, -1, 80.0, SUCCESS)
    assert state.limit == pytest.approx(4.0)


def test_a_full_limit_grows_while_calls_come_back_fast() -> None:
    """In flight at the limit and latency within the tolerance: GROWTH / limit a success."""
    wire = ADAPTIVE.wire()
    state = measured(rule.LimiterState(limit=4.0))
    state.slots = {f"s{i}": 1e9 for i in range(4)}
    rule.release(state, wire, 1000.0, "s0", 0, -1, 40.0, SUCCESS)
    assert state.limit == pytest.approx(4.0 + rule.GROWTH / 4)


def test_an_idle_limit_does_not_grow() -> None:
    """Few calls in flight: the limit held nothing back, so it learns nothing."""
    wire = ADAPTIVE.wire()
    state = measured(rule.LimiterState(limit=10.0))
    state.slots = {"s0": 1e9}
    rule.release(state, wire, 1000.0, "s0", 0, -1, 40.0, SUCCESS)
    assert state.limit == 10.0


def test_the_no_load_latency_is_measured_again_at_half_the_limit() -> None:
    """Every PROBE_INTERVAL_MS the limit halves for PROBE_CALLS calls that started after."""
    wire = ADAPTIVE.wire()
    state = measured(rule.LimiterState(limit=8.0), noload=40.0)
    state.probe_next = 5000.0
    rule.release(state, wire, 5000.0, "a", 0, -1, 40.0, SUCCESS)
    assert state.probe_from == 5000.0
    assert rule.capacity(state, wire) == 4
    rule.release(state, wire, 5010.0, "b", 0, -1, 60.0, SUCCESS)  # started before: not timed
    for i in range(rule.PROBE_CALLS):
        rule.release(state, wire, 5100.0 + i, f"p{i}", 0, -1, 50.0, SUCCESS)
    assert state.noload == pytest.approx(50.0)
    assert state.probe_from == 0.0 and rule.capacity(state, wire) == 8
    assert state.probe_next == pytest.approx(5109.0 + rule.PROBE_INTERVAL_MS)


# -- a simulated endpoint of known capacity --------------------------------------------------


def test_the_limit_finds_the_knee_and_follows_the_capacity() -> None:
    """16 callers, capacity 4 with a queue of 4, 40 ms a call: near the knee, almost no
    overload; capacity halved, then doubled back: it follows within seconds."""
    run = simulate(ADAPTIVE, seconds=90, changes=[(30, 2), (60, 4)])
    steady = run.window(10, 30, capacity=4)
    assert steady["goodput"] >= 0.9 and steady["overload"] <= 0.01 and steady["p99"] <= 2
    assert 4 <= steady["limit"] <= 8
    halved = run.window(40, 60, capacity=2)
    assert halved["goodput"] >= 0.9 and halved["overload"] <= 0.02 and halved["limit"] <= 4.5
    restored = run.window(65, 90, capacity=4)
    assert restored["goodput"] >= 0.9 and restored["limit"] >= 4
    assert max(r["opened"] for r in (steady, halved, restored)) == 0


def test_without_the_rule_the_same_callers_flood_the_queue() -> None:
    """The baseline the rule is measured against: a static limit of 16 meets "overloaded"."""
    run = simulate(Limit(concurrency=16), seconds=20)
    assert run.window(5, 20, capacity=4)["overload"] > 0.3


# -- on every store: the same rule in Python and in Lua --------------------------------------


def adaptive_breaker(name: str, store: Store, **limit: object) -> CircuitBreaker:
    fields = {"adaptive": True, "min_concurrency": 1, "max_concurrency": 64, **limit}
    return CircuitBreaker(
        name,
        policy=BreakerPolicy(failure_threshold=3),
        store=store,
        limit=Limit(**fields),  # type: ignore[arg-type]
    )


def test_overload_never_opens_the_circuit_above_the_minimum(
    name: str, store: Store, clock: FakeClock
) -> None:
    """Thirty "overloaded" answers in a row: the limit falls to its minimum, then, and only
    then, they count toward opening."""
    breaker = adaptive_breaker(name, store, concurrency=32)
    opened_at_limit = None
    for _ in range(60):
        ticket = breaker.admit()
        clock.advance(0.05)
        breaker.record(ticket, Outcome.OVERLOAD, 50.0)
        status = breaker.status()
        assert status is not None and status.limit is not None
        if status.state is not State.CLOSED:
            opened_at_limit = status.limit.concurrency
            break
        clock.advance(0.2)
    assert opened_at_limit == 1.0


def test_the_adaptive_limit_refuses_past_its_floor(name: str, store: Store) -> None:
    """Its floor is the slots: a limit of 2.9 admits two calls."""
    breaker = adaptive_breaker(name, store, concurrency=2)
    held = [breaker.admit(), breaker.admit()]
    with pytest.raises(LimitExceeded):
        breaker.admit()
    for ticket in held:
        breaker.record(ticket, Outcome.SUCCESS, 10.0)


_steps = st.lists(
    st.tuples(
        st.sampled_from(["admit", "success", "overload", "failure", "advance"]),
        st.floats(min_value=1, max_value=400, allow_nan=False),
    ),
    min_size=1,
    max_size=60,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=_steps)
def test_the_lua_limit_makes_the_same_decisions_as_the_python_one(
    steps: list[tuple[str, float]], redis_url: str
) -> None:
    """Any sequence of calls, answers and time: both stores admit, refuse and adapt alike."""
    from cbtasks import MemoryStore, RedisStore

    clock = FakeClock()
    # A name of its own per example: Redis is emptied after the test, not between its
    # examples, and hypothesis may run the same steps twice (its database replays).
    name = f"twin-{uuid.uuid4().hex}"
    memory = adaptive_breaker(name, MemoryStore(clock=clock), concurrency=3, rate="40/s", burst=2)
    with RedisStore(redis_url, clock=clock) as store:
        redis = adaptive_breaker(name, store, concurrency=3, rate="40/s", burst=2)
        held: list[tuple[object, object]] = []
        # First the no-load latency's measure, so that the steps can grow and cut.
        warm_up = [("admit", 0.0), ("advance", 30.0), ("success", 40.0)] * (rule.PROBE_CALLS + 2)
        for action, number in warm_up + steps:
            if action == "advance":
                clock.advance(number / 1000)
                continue
            if action == "admit":
                answers = []
                for breaker in (memory, redis):
                    breaker._rate_hold = 0.0  # the stores decide, not the local hold
                    try:
                        answers.append(breaker.admit())
                    except LimitExceeded as exc:
                        answers.append((exc.kind, round(exc.retry_after, 3)))
                if isinstance(answers[0], tuple) or isinstance(answers[1], tuple):
                    assert answers[0] == answers[1]
                else:
                    held.append((answers[0], answers[1]))
                continue
            if not held:
                continue
            outcome = {"success": Outcome.SUCCESS, "overload": Outcome.OVERLOAD}.get(
                action, Outcome.FAILURE
            )
            mine, theirs = held.pop(0)
            memory.record(mine, outcome, number)  # type: ignore[arg-type]
            redis.record(theirs, outcome, number)  # type: ignore[arg-type]
            a, b = memory.status(), redis.status()
            assert a is not None and b is not None and a.limit and b.limit
            assert (a.state, a.limit.in_flight) == (b.state, b.limit.in_flight)
            assert math.isclose(a.limit.concurrency or 0, b.limit.concurrency or 0, rel_tol=1e-9)
