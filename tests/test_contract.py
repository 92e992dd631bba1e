"""The breaker's contract, run on every store (MemoryStore and RedisStore)."""

from __future__ import annotations

import pytest

from cbtasks import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    CountWindow,
    Outcome,
    State,
    StateChange,
    Store,
    TimeWindow,
)
from tests.conftest import FakeClock


class EndpointDown(Exception):
    """What the fake endpoint raises."""


class BadInput(Exception):
    """The caller's own mistake."""


def ok() -> str:
    return "ok"


def down() -> str:
    raise EndpointDown("503")


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(EndpointDown):
            breaker.call(down)


def make(name: str, store: Store, **policy: object) -> CircuitBreaker:
    return CircuitBreaker(name, policy=BreakerPolicy(**policy), store=store)  # type: ignore[arg-type]


def test_closed_breaker_passes_calls_through(name: str, store: Store) -> None:
    """No error, no problem."""
    breaker = make(name, store)
    assert breaker.call(ok) == "ok"
    assert breaker.state is State.CLOSED


def test_consecutive_failures_open_it(name: str, store: Store) -> None:
    """failure_threshold failures in a row open the circuit."""
    breaker = make(name, store, failure_threshold=3)
    fail(breaker, 2)
    assert breaker.state is State.CLOSED
    fail(breaker)
    assert breaker.state is State.OPEN


def test_a_success_resets_the_consecutive_count(name: str, store: Store) -> None:
    """Failures must be consecutive to trip it."""
    breaker = make(name, store, failure_threshold=3)
    fail(breaker, 2)
    breaker.call(ok)
    fail(breaker, 2)
    assert breaker.state is State.CLOSED


def test_open_circuit_rejects_without_calling(name: str, store: Store, clock: FakeClock) -> None:
    """While open, calls raise CircuitOpenError with name and retry_after."""
    breaker = make(name, store, failure_threshold=1, open_seconds=10)
    fail(breaker)
    calls = []
    clock.advance(4)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(calls.append, 1)
    assert calls == []
    assert info.value.name == name
    assert info.value.retry_after == pytest.approx(6, abs=0.01)


def test_fallback_answers_while_open(name: str, store: Store) -> None:
    """A fallback gets the call's arguments and its result is returned."""
    breaker = CircuitBreaker(
        name, store=store, fail_max=1, reset_timeout=10, fallback=lambda x: f"cached {x}"
    )
    with pytest.raises(EndpointDown):
        breaker.call(lambda x: down(), 1)
    assert breaker.call(lambda x: "fresh", 7) == "cached 7"


def test_probe_after_open_period_closes_on_success(
    name: str, store: Store, clock: FakeClock
) -> None:
    """After open_seconds one probe goes through; its success closes the circuit."""
    breaker = make(name, store, failure_threshold=1, open_seconds=5)
    fail(breaker)
    clock.advance(4.999)
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    clock.advance(0.001)
    assert breaker.state is State.HALF_OPEN
    assert breaker.call(ok) == "ok"
    assert breaker.state is State.CLOSED


def test_failed_probe_reopens(name: str, store: Store, clock: FakeClock) -> None:
    """A failed probe opens the circuit for another open period."""
    breaker = make(name, store, failure_threshold=1, open_seconds=5)
    fail(breaker)
    clock.advance(5)
    fail(breaker)
    assert breaker.state is State.OPEN
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert info.value.retry_after == pytest.approx(5, abs=0.01)


def test_only_half_open_probes_go_through_at_once(
    name: str, store: Store, clock: FakeClock
) -> None:
    """half_open_probes calls probe concurrently; the rest are rejected."""
    breaker = make(name, store, failure_threshold=1, open_seconds=1, half_open_probes=2)
    fail(breaker)
    clock.advance(1)
    first, second = breaker.admit(), breaker.admit()
    assert first and second and first != second
    with pytest.raises(CircuitOpenError) as info:
        breaker.admit()
    assert "probes" in info.value.reason
    breaker.record(first, Outcome.SUCCESS)
    assert breaker.state is State.CLOSED
    assert breaker.admit() is None


def test_half_open_successes_needed_to_close(name: str, store: Store, clock: FakeClock) -> None:
    """With half_open_successes=3 it takes three good probes to close."""
    breaker = make(
        name, store, failure_threshold=1, open_seconds=1, half_open_probes=1, half_open_successes=3
    )
    fail(breaker)
    clock.advance(1)
    for expected in (State.HALF_OPEN, State.HALF_OPEN, State.CLOSED):
        breaker.call(ok)
        assert breaker.state is expected


def test_probe_lease_gives_the_slot_back(name: str, store: Store, clock: FakeClock) -> None:
    """A probe never reported (its worker died) frees its slot after the lease."""
    breaker = make(name, store, failure_threshold=1, open_seconds=1, probe_lease_seconds=30)
    fail(breaker)
    clock.advance(1)
    lost_probe = breaker.admit()
    assert lost_probe is not None
    clock.advance(29.9)
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    clock.advance(0.1)
    assert breaker.call(ok) == "ok"
    assert breaker.state is State.CLOSED
    # The dead worker's late report changes nothing.
    breaker.record(lost_probe, Outcome.FAILURE)
    assert breaker.state is State.CLOSED


def test_open_period_grows_by_backoff_up_to_the_cap(
    name: str, store: Store, clock: FakeClock
) -> None:
    """Each trip in a row multiplies the open period by backoff_factor, up to the cap."""
    breaker = make(
        name, store, failure_threshold=1, open_seconds=2, backoff_factor=3, max_open_seconds=10
    )
    fail(breaker)
    periods = []
    for _ in range(4):
        with pytest.raises(CircuitOpenError) as info:
            breaker.call(ok)
        periods.append(round(info.value.retry_after, 3))
        clock.advance(info.value.retry_after)
        fail(breaker)  # the probe fails
    assert periods == [2, 6, 10, 10]


def test_backoff_starts_over_after_a_close(name: str, store: Store, clock: FakeClock) -> None:
    """A closed circuit forgets earlier trips."""
    breaker = make(name, store, failure_threshold=1, open_seconds=2, backoff_factor=2)
    fail(breaker)
    clock.advance(2)
    fail(breaker)
    clock.advance(4)
    breaker.call(ok)
    fail(breaker)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert info.value.retry_after == pytest.approx(2, abs=0.01)


def test_jitter_stretches_the_open_period(name: str, store: Store) -> None:
    """With jitter 0.5 the period lies between 1 and 1.5 times the base."""
    breaker = make(name, store, failure_threshold=1, open_seconds=10, jitter=0.5)
    fail(breaker)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert 10 <= info.value.retry_after <= 15


def test_failure_rate_over_count_window_trips(name: str, store: Store) -> None:
    """A partial outage (50% errors) trips a rate policy, never the consecutive count."""
    breaker = make(
        name,
        store,
        failure_threshold=100,
        failure_rate=0.5,
        window=CountWindow(calls=10),
        min_calls=10,
    )
    for _ in range(4):
        breaker.call(ok)
        fail(breaker)
    breaker.call(ok)
    assert breaker.state is State.CLOSED  # 4 of 9: not enough calls yet
    fail(breaker)
    assert breaker.state is State.OPEN  # 5 of 10


def test_count_window_forgets_old_calls(name: str, store: Store) -> None:
    """Only the last window.calls calls count."""
    breaker = make(
        name,
        store,
        failure_threshold=100,
        failure_rate=0.5,
        window=CountWindow(calls=4),
        min_calls=4,
    )
    fail(breaker)
    for _ in range(5):
        breaker.call(ok)
    fail(breaker)
    assert breaker.state is State.CLOSED  # window holds ok, ok, ok, fail
    fail(breaker)
    assert breaker.state is State.OPEN  # ok, ok, fail, fail


def test_time_window_forgets_old_calls(name: str, store: Store, clock: FakeClock) -> None:
    """Calls older than window.seconds no longer count."""
    breaker = make(
        name,
        store,
        failure_threshold=100,
        failure_rate=0.5,
        window=TimeWindow(seconds=10),
        min_calls=4,
    )
    fail(breaker, 3)
    clock.advance(11)
    breaker.call(ok)
    breaker.call(ok)
    fail(breaker)
    breaker.call(ok)
    assert breaker.state is State.CLOSED  # 1 of 4 in the window
    fail(breaker)
    assert breaker.state is State.CLOSED  # 2 of 5
    fail(breaker)
    assert breaker.state is State.OPEN  # 3 of 6
    status = breaker.status()
    assert status is not None and status.trips == 1


def test_time_window_counts_within_window(name: str, store: Store, clock: FakeClock) -> None:
    """Failures spread over the window still add up."""
    breaker = make(
        name,
        store,
        failure_threshold=100,
        failure_rate=0.6,
        window=TimeWindow(seconds=10),
        min_calls=5,
    )
    for _ in range(3):
        fail(breaker)
        clock.advance(2)
    breaker.call(ok)
    fail(breaker)
    assert breaker.state is State.OPEN  # 4 failures of 5 within 10 s


def test_slow_call_rate_trips(name: str, store: Store) -> None:
    """Successful but slow calls trip the breaker by their rate."""
    breaker = make(
        name,
        store,
        slow_call_seconds=1.0,
        slow_call_rate=0.5,
        window=CountWindow(calls=4),
        min_calls=4,
    )
    for elapsed_ms in (100, 1500, 200, 2000):
        breaker.record(breaker.admit(), Outcome.SUCCESS, elapsed_ms)
    assert breaker.state is State.OPEN


def test_slow_probe_reopens(name: str, store: Store, clock: FakeClock) -> None:
    """A probe slower than slow_call_seconds counts as failed."""
    breaker = make(name, store, failure_threshold=1, open_seconds=1, slow_call_seconds=0.5)
    fail(breaker)
    clock.advance(1)
    breaker.record(breaker.admit(), Outcome.SUCCESS, 900)
    assert breaker.state is State.OPEN


def test_ignored_exceptions_do_not_count(name: str, store: Store, clock: FakeClock) -> None:
    """The caller's own errors neither trip nor close the circuit."""
    breaker = make(name, store, failure_threshold=2, open_seconds=1, ignored_exceptions=(BadInput,))

    def bad() -> None:
        raise BadInput("missing field")

    for _ in range(5):
        with pytest.raises(BadInput):
            breaker.call(bad)
    assert breaker.state is State.CLOSED
    fail(breaker, 2)
    clock.advance(1)
    with pytest.raises(BadInput):
        breaker.call(bad)  # the probe's slot is given back, nothing decided
    assert breaker.state is State.HALF_OPEN
    breaker.call(ok)
    assert breaker.state is State.CLOSED


def test_exceptions_outside_failure_exceptions_are_successes(name: str, store: Store) -> None:
    """Only the listed exceptions count as endpoint failures."""
    breaker = make(name, store, failure_threshold=1, failure_exceptions=(EndpointDown,))
    with pytest.raises(KeyError):
        breaker.call(lambda: {}["x"])
    assert breaker.state is State.CLOSED
    fail(breaker)
    assert breaker.state is State.OPEN


def test_retry_after_keeps_it_open_at_least_that_long(
    name: str, store: Store, clock: FakeClock
) -> None:
    """A failure carrying retry_after (429/503) opens at once for at least that long."""
    breaker = make(name, store, failure_threshold=5, open_seconds=2)

    class TooMany(Exception):
        retry_after = 30.0

    def rate_limited() -> None:
        raise TooMany

    with pytest.raises(TooMany):
        breaker.call(rate_limited)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert info.value.retry_after == pytest.approx(30, abs=0.01)


def test_late_outcomes_do_not_move_an_open_circuit(
    name: str, store: Store, clock: FakeClock
) -> None:
    """A call admitted before the trip that ends after it is not counted."""
    breaker = make(name, store, failure_threshold=2, open_seconds=1)
    slow_call = breaker.admit()
    fail(breaker, 2)
    clock.advance(1)
    breaker.record(slow_call, Outcome.SUCCESS)
    assert breaker.state is State.HALF_OPEN


def test_force_open_and_force_close(name: str, store: Store, clock: FakeClock) -> None:
    """An operator can open the circuit until told otherwise, and close it."""
    breaker = make(name, store, open_seconds=1)
    breaker.force_open()
    clock.advance(1000)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(ok)
    assert "forced open" in info.value.reason
    breaker.force_close()
    assert breaker.call(ok) == "ok"
    assert breaker.state is State.CLOSED


def test_force_half_open_lets_the_probes_decide(name: str, store: Store) -> None:
    """From closed, or an operator's open: half-open now, everywhere; a probe's failure opens
    it, a probe's success closes it."""
    events: list[StateChange] = []
    breaker = make(name, store, open_seconds=300, half_open_probes=1)
    breaker.add_listener(events.append)
    breaker.force_half_open()
    assert breaker.state is State.HALF_OPEN
    other = make(name, store, open_seconds=300)  # another process: the same circuit
    assert other.state is State.HALF_OPEN
    fail(other)  # the probe fails
    assert breaker.state is State.OPEN
    breaker.force_open()
    breaker.force_half_open()
    assert breaker.call(ok) == "ok"  # the probe succeeds
    assert breaker.state is State.CLOSED
    assert ("closed", "half_open", "forced half-open") in [
        (e.from_state.value, e.to_state.value, e.reason) for e in events
    ]


def test_reset_forgets_everything(name: str, store: Store) -> None:
    """reset() closes the circuit and clears counts and backoff."""
    breaker = make(name, store, failure_threshold=2)
    fail(breaker)
    breaker.reset()
    fail(breaker)
    assert breaker.state is State.CLOSED
    breaker.force_open()
    breaker.reset()
    assert breaker.call(ok) == "ok"


def test_disabled_breaker_admits_but_keeps_counting(
    name: str, store: Store, clock: FakeClock
) -> None:
    """Shadow mode: calls always go through; the state still follows the policy."""
    breaker = make(name, store, failure_threshold=2, open_seconds=1)
    breaker.disable()
    fail(breaker, 2)
    assert breaker.state is State.OPEN
    assert breaker.call(ok) == "ok"
    clock.advance(1)
    breaker.call(ok)  # the shadow probe succeeds
    assert breaker.state is State.CLOSED
    breaker.enable()
    fail(breaker, 2)
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)


def test_listeners_get_every_transition(name: str, store: Store, clock: FakeClock) -> None:
    """State-change listeners receive breaker, from, to, reason and time."""
    events: list[StateChange] = []
    breaker = CircuitBreaker(
        name,
        policy=BreakerPolicy(failure_threshold=2, open_seconds=1),
        store=store,
        listeners=[events.append],
    )
    fail(breaker, 2)
    clock.advance(1)
    breaker.call(ok)
    assert [(e.from_state, e.to_state) for e in events] == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]
    assert events[0].breaker == name
    assert events[0].reason == "2 consecutive failures"
    assert events[0].at == pytest.approx(clock.now - 1, abs=0.002)


def test_breakers_with_one_name_share_a_circuit(name: str, store: Store) -> None:
    """Two breaker objects with the same name and store see one state."""
    first = make(name, store, failure_threshold=2)
    second = make(name, store, failure_threshold=2)
    fail(first)
    fail(second)
    assert first.state is State.OPEN
    with pytest.raises(CircuitOpenError):
        second.call(ok)


def test_context_manager_guards_a_block(name: str, store: Store) -> None:
    """`with breaker:` records the block's outcome and refuses entry while open."""
    breaker = make(name, store, failure_threshold=1)
    with breaker:
        pass
    with pytest.raises(EndpointDown), breaker:
        down()
    with pytest.raises(CircuitOpenError), breaker:
        pytest.fail("the block must not run")


def test_status_reports_counts(name: str, store: Store, clock: FakeClock) -> None:
    """status() shows state, counts and probes for operators."""
    breaker = make(
        name,
        store,
        failure_threshold=3,
        failure_rate=0.9,
        window=CountWindow(calls=10),
        min_calls=5,
    )
    assert breaker.status() is None
    fail(breaker, 2)
    breaker.call(ok)
    fail(breaker)
    status = breaker.status()
    assert status is not None
    assert (status.state, status.consecutive_failures, status.window_calls) == (State.CLOSED, 1, 4)
    assert status.window_failures == 3


def test_rejected_while_probing_waits_about_one_probe(
    name: str, store: Store, clock: FakeClock
) -> None:
    """Every probe slot taken: come back in about the probe's running time, not a whole period."""
    breaker = make(name, store, failure_threshold=1, open_seconds=10, probe_lease_seconds=30)
    fail(breaker)
    clock.advance(10)
    probe = breaker.admit()
    assert probe is not None
    waits = []
    for step in (0.05, 0.45, 2.5):
        clock.advance(step)
        other = make(name, store, failure_threshold=1, open_seconds=10, probe_lease_seconds=30)
        with pytest.raises(CircuitOpenError) as info:
            other.admit()
        waits.append(round(info.value.retry_after, 3))
    # At least 100 ms, then as long as the probe has run so far: 0.5 s, then 3 s.
    assert waits == [0.1, 0.5, 3.0]
    breaker.record(probe, Outcome.SUCCESS)
    assert breaker.state is State.CLOSED


def test_every_transition_says_why(name: str, store: Store, clock: FakeClock) -> None:
    """The reasons operators read in logs and listeners, for each way a state changes."""
    events: list[StateChange] = []
    breaker = make(name, store, failure_threshold=2, open_seconds=5, probe_lease_seconds=30)
    breaker.add_listener(events.append)
    fail(breaker, 2)
    other = make(name, store, failure_threshold=2, open_seconds=5)  # another process: asks
    with pytest.raises(CircuitOpenError):
        other.admit()
    clock.advance(5)
    assert breaker.call(ok) == "ok"
    fail(breaker, 2)
    clock.advance(5)
    fail(breaker)  # the probe
    clock.advance(5)
    breaker.record(breaker.admit(), Outcome.FAILURE, retry_after=7.0)  # a probe asked to wait
    clock.advance(7)
    probe = breaker.admit()
    breaker.record(probe, Outcome.SUCCESS)
    breaker.record(breaker.admit(), Outcome.FAILURE, retry_after=0.001)  # closed: at once
    reasons = [(e.from_state.value, e.to_state.value, e.reason) for e in events]
    assert reasons == [
        ("closed", "open", "2 consecutive failures"),
        ("open", "half_open", "open period elapsed"),
        ("half_open", "closed", "1 probe(s) succeeded"),
        ("closed", "open", "2 consecutive failures"),
        ("open", "half_open", "open period elapsed"),
        ("half_open", "open", "probe failed"),
        ("open", "half_open", "open period elapsed"),
        ("half_open", "open", "probe failed"),
        ("open", "half_open", "open period elapsed"),
        ("half_open", "closed", "1 probe(s) succeeded"),
        ("closed", "open", "endpoint asked to retry after 1 ms"),
    ]


def test_rate_trips_say_which_rate(name: str, store: Store) -> None:
    """A failure-rate or slow-call-rate trip names the rate and the calls it is over."""
    events: list[StateChange] = []
    breaker = make(
        name, store, failure_threshold=100, failure_rate=0.5, window=CountWindow(calls=4),
        min_calls=4,
    )  # fmt: skip
    breaker.add_listener(events.append)
    for outcome in (Outcome.SUCCESS, Outcome.FAILURE, Outcome.SUCCESS, Outcome.FAILURE):
        breaker.record(breaker.admit(), outcome)
    assert [e.reason for e in events] == ["failure rate 50% over 4 calls"]
    slow_events: list[StateChange] = []
    slow = make(
        f"{name}-slow", store, failure_threshold=100, slow_call_seconds=1.0, slow_call_rate=0.5,
        window=CountWindow(calls=4), min_calls=4,
    )  # fmt: skip
    slow.add_listener(slow_events.append)
    for elapsed_ms in (10, 2000, 10, 2000):
        slow.record(slow.admit(), Outcome.SUCCESS, elapsed_ms)
    assert [e.reason for e in slow_events] == ["slow-call rate 50% over 4 calls"]


def test_probe_edges(name: str, store: Store, clock: FakeClock) -> None:
    """A probe reported exactly at its lease end, or under an unknown id, or a late outcome
    in an open circuit: none changes anything. A full half-open waits at most the open period."""
    breaker = make(name, store, failure_threshold=1, open_seconds=1, probe_lease_seconds=30)
    fail(breaker)
    clock.advance(1)
    probe = breaker.admit()
    assert probe is not None
    breaker.record("no-such-probe", Outcome.SUCCESS)  # ignored, no error
    clock.advance(5)
    with pytest.raises(CircuitOpenError) as info:
        make(name, store, failure_threshold=1, open_seconds=1, probe_lease_seconds=30).admit()
    assert info.value.retry_after == pytest.approx(1.0)  # the open period, not 5 s of running
    clock.advance(25)
    breaker.record(probe, Outcome.SUCCESS)  # exactly at the lease's end: too late
    status = breaker.status()
    assert status is not None and status.state is State.HALF_OPEN
    trips_before = status.trips
    fresh = breaker.admit()
    breaker.record(fresh, Outcome.FAILURE)
    breaker.record(None, Outcome.FAILURE)  # a late plain outcome while open
    status = breaker.status()
    assert status is not None and status.state is State.OPEN
    assert status.trips == trips_before + 1 and status.consecutive_failures == 0


def test_operator_commands_say_what_they_did(name: str, store: Store, clock: FakeClock) -> None:
    """Forced open, forced closed, reset and a passed health check: one event each, with its
    reason, and none when the state does not change."""
    events: list[StateChange] = []
    breaker = make(name, store, failure_threshold=1, open_seconds=5)
    breaker.add_listener(events.append)
    breaker.call(ok)
    breaker.force_close()  # closed already: no event
    breaker.reset()  # closed already: no event
    breaker.force_open()
    breaker.force_open()  # open already: no event
    breaker.health_passed()  # a forced open is the operator's: no event
    breaker.force_close()
    fail(breaker)
    breaker.health_passed()
    breaker.health_passed()  # half-open already: no event
    fail(breaker)
    breaker.reset()
    reasons = [(e.from_state.value, e.to_state.value, e.reason) for e in events]
    assert reasons == [
        ("closed", "open", "forced open"),
        ("open", "closed", "forced closed"),
        ("closed", "open", "1 consecutive failures"),
        ("open", "half_open", "health check passed"),
        ("half_open", "open", "probe failed"),
        ("open", "closed", "reset"),
    ]


def test_open_then_disable_then_enable_ends_closed(name: str, store: Store) -> None:
    """Lifting an operator's open for shadow mode closes it; enabling again keeps it closed."""
    breaker = make(name, store)
    breaker.call(lambda: None)
    events: list[StateChange] = []
    breaker.add_listener(events.append)
    breaker.force_open()
    breaker.disable()
    assert breaker.state is State.CLOSED
    breaker.enable()
    assert breaker.state is State.CLOSED
    assert breaker.call(lambda: "through") == "through"
    assert [(e.from_state, e.to_state, e.reason) for e in events] == [
        (State.CLOSED, State.OPEN, "forced open"),
        (State.OPEN, State.CLOSED, "disabled by an operator"),
    ]


def test_enable_after_an_operators_open_probes_first(name: str, store: Store) -> None:
    """`enable` alone leaves a forced open the policy's way: through a half-open probe."""
    breaker = make(name, store)
    breaker.force_open()
    breaker.enable()
    assert breaker.state is State.HALF_OPEN


def test_the_failure_that_opened_it_is_kept_and_said(
    name: str, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The last failure counted (type and first line, never a credential) is kept with the
    state for every process, and the trip's log line says it; every transition is logged."""
    import logging

    caplog.set_level(logging.INFO, logger="cbtasks")
    breaker = make(name, store, failure_threshold=2, open_seconds=1)

    def refused() -> None:
        raise ConnectionError("cannot reach http://svc:s3cret@model:8000/predict\nsecond line")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            breaker.call(refused)
    other = make(name, store, failure_threshold=2, open_seconds=1)  # another process
    status = other.status()
    assert status is not None
    assert status.last_failure == "ConnectionError: cannot reach http://***@model:8000/predict"
    assert other.why_open() == status.last_failure
    said = [r.getMessage() for r in caplog.records]
    assert any(
        "closed -> open (2 consecutive failures; last failure: ConnectionError" in s for s in said
    ), said
    assert not any("s3cret" in s for s in said)
    breaker.force_half_open()
    assert any("-> half_open" in s for s in [r.getMessage() for r in caplog.records])
    breaker.reset()
    assert breaker.status() is None or breaker.status().last_failure is None  # type: ignore[union-attr]


def test_the_history_keeps_every_transition_and_command(
    name: str, store: Store, clock: FakeClock
) -> None:
    """The scripts note each transition (a trip with its failure) and each operator's
    command (who, why) at the store's time; a reset keeps the record."""
    breaker = make(name, store, failure_threshold=1, open_seconds=1)
    fail(breaker)
    clock.advance(1)
    assert breaker.call(ok) == "ok"
    clock.advance(10)
    breaker.force_open(by="alice@ops", why="rolling deploy")
    breaker.enable()  # a mode change: the state it leaves is noted
    breaker.reset(by="bob@ops")
    entries = breaker.history()
    seen = [(e.from_state, e.to_state, e.state, e.command) for e in entries]
    assert seen == [
        ("closed", "open", None, None),
        ("open", "half_open", None, None),
        ("half_open", "closed", None, None),
        ("closed", "open", None, "force_open"),
        (None, None, "open", "enable"),
        ("open", "closed", None, "reset"),
    ]
    trip = entries[0]
    assert (trip.failure, trip.reason) == ("EndpointDown: 503", "1 consecutive failures")
    assert (entries[3].by, entries[3].why) == ("alice@ops", "rolling deploy")
    assert entries[3].at == pytest.approx(clock.now, abs=0.01)
    assert [e.command for e in breaker.history(since=clock.now - 1)] == [
        "force_open",
        "enable",
        "reset",
    ]
    assert len(breaker.history(count=2)) == 2
