"""A breaker's limit, run on every store (MemoryStore, RedisStore, AsyncRedisStore)."""

from __future__ import annotations

import math
import threading
import time

import pytest

from cbtasks import (
    BreakerPolicy,
    CallRejected,
    CircuitBreaker,
    CircuitOpenError,
    Limit,
    LimitExceeded,
    MemoryStore,
    Outcome,
    PolicyError,
    RedisStore,
    State,
    Store,
    Ticket,
    report_tokens,
    tokens_of,
)
from tests.conftest import FakeClock


class EndpointDown(Exception):
    """What the fake endpoint raises."""


def ok() -> str:
    return "ok"


def make(name: str, store: Store, limit: Limit, **policy: object) -> CircuitBreaker:
    return CircuitBreaker(name, policy=BreakerPolicy(**policy), store=store, limit=limit)  # type: ignore[arg-type]


def refused(breaker: CircuitBreaker, **admit: object) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as info:
        breaker.admit(**admit)  # type: ignore[arg-type]
    return info.value


# -- concurrency --------------------------------------------------------------------


def test_concurrency_holds_calls_in_flight_to_the_limit(name: str, store: Store) -> None:
    """Two slots: a third call is refused until one of the two is recorded."""
    breaker = make(name, store, Limit(concurrency=2))
    first, second = breaker.admit(), breaker.admit()
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    exc = refused(breaker)
    assert exc.kind == "concurrency" and exc.retry_after > 0
    breaker.record(first, Outcome.SUCCESS, 10.0)
    third = breaker.admit()
    assert third is not None
    refused(breaker)
    breaker.record(second, Outcome.FAILURE, 10.0)
    breaker.record(third, Outcome.SUCCESS, 10.0)
    assert breaker.status().limit.in_flight == 0  # type: ignore[union-attr]


def test_every_process_shares_the_slots(name: str, store: Store) -> None:
    """Slots are the breaker's, not a process's: another breaker object of the name sees them."""
    here = make(name, store, Limit(concurrency=1))
    there = make(name, store, Limit(concurrency=1))
    held = here.admit()
    refused(there)
    here.record(held, Outcome.SUCCESS)
    there.record(there.admit(), Outcome.SUCCESS)


def test_a_dead_holders_slot_comes_back_after_its_lease(
    name: str, store: Store, clock: FakeClock
) -> None:
    """A slot never given back (its worker was SIGKILLed) is free once its lease ends."""
    breaker = make(name, store, Limit(concurrency=1, lease=30))
    breaker.admit()  # never recorded
    clock.advance(29.9)
    refused(breaker)
    clock.advance(0.1)
    assert breaker.admit() is not None


def test_the_wait_for_a_slot_is_the_oldest_calls_expected_end(
    name: str, store: Store, clock: FakeClock
) -> None:
    """retry_after comes from the limit's state: the oldest call's start plus the usual duration."""
    breaker = make(name, store, Limit(concurrency=1))
    for _ in range(3):  # calls of 200 ms teach it the duration
        breaker.record(breaker.admit(), Outcome.SUCCESS, 200.0)
    held = breaker.admit()
    clock.advance(0.05)
    assert refused(breaker).retry_after == pytest.approx(0.15, abs=0.002)
    breaker.record(held, Outcome.SUCCESS, 200.0)


# -- rate -----------------------------------------------------------------------------


def test_rate_spaces_calls_evenly(name: str, store: Store, clock: FakeClock) -> None:
    """10/s: one call, then the next 100 ms later; a refusal says exactly when."""
    breaker = make(name, store, Limit(rate="10/s"))
    assert breaker.call(ok) == "ok"
    exc = refused(breaker)
    assert exc.kind == "rate" and exc.retry_after == pytest.approx(0.1, abs=0.001)
    clock.advance(0.1)
    assert breaker.call(ok) == "ok"


def test_rate_lets_no_window_through_more_than_rate_plus_burst(
    name: str, store: Store, clock: FakeClock
) -> None:
    """A caller trying every 7 ms for 5 s at 50/s, burst 3: 50 a second, never 53 in a second."""
    breaker = make(name, store, Limit(rate="50/s", burst=3))
    admitted: list[float] = []
    for _ in range(int(5000 / 7)):
        try:
            breaker.admit()
        except LimitExceeded:
            pass
        else:
            admitted.append(clock.now)
        breaker._rate_hold = 0.0  # ask the store every time: the store's rule is under test
        clock.advance(0.007)
    start = admitted[0]
    assert len(admitted) == pytest.approx(5 * 50 + 2, abs=2)
    for i, at in enumerate(admitted):
        in_window = sum(1 for t in admitted[i:] if t < at + 1.0)
        assert in_window <= 50 + 2, (at - start, in_window)


def test_a_process_refused_by_the_rate_waits_without_asking(
    name: str, store: Store, clock: FakeClock
) -> None:
    """A rate refusal is exact: the process refuses locally until it ends (no round trip)."""
    breaker = make(name, store, Limit(rate="1/s"))
    breaker.call(ok)
    refused(breaker)
    assert breaker._rate_hold > clock.now
    clock.advance(1)
    breaker.call(ok)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_caller_that_may_wait_reserves_the_next_permit(
    name: str, kind: str, request: pytest.FixtureRequest
) -> None:
    """With wait, a rate refusal becomes a reservation: the call sleeps until its permit
    (real clocks: Redis's TIME, the process's own)."""
    store: Store = (
        MemoryStore() if kind == "memory" else RedisStore(request.getfixturevalue("redis_url"))
    )
    breaker = make(name, store, Limit(rate="20/s", wait=1.0))
    started = time.monotonic()
    for _ in range(5):
        breaker.call(ok)
    elapsed = time.monotonic() - started
    if isinstance(store, RedisStore):
        store.close()
    # The first at once, the next four 50 ms apart.
    assert elapsed == pytest.approx(0.2, abs=0.05)


# -- tokens ---------------------------------------------------------------------------


def test_tokens_are_reserved_and_settled(name: str, store: Store, clock: FakeClock) -> None:
    """1000 tokens a minute, 400 reserved a call: two fit, the third once the two settle low."""
    breaker = make(name, store, Limit(tokens="1000/m", estimate=400))
    first, second = breaker.admit(tokens=400), breaker.admit(tokens=400)
    assert refused(breaker, tokens=400).kind == "tokens"
    breaker.record(first, Outcome.SUCCESS, 5.0, tokens_used=100)
    breaker.record(second, Outcome.SUCCESS, 5.0, tokens_used=100)
    third = breaker.admit(tokens=400)  # 200 spent, 400 more fit
    assert breaker.status().limit.tokens_available == 400  # type: ignore[union-attr]
    breaker.record(third, Outcome.SUCCESS, 5.0)  # unknown: the 400 stand
    assert breaker.status().limit.tokens_available == 400  # type: ignore[union-attr]
    clock.advance(6)  # a tenth of a minute earns 100 tokens
    assert breaker.status().limit.tokens_available == 500  # type: ignore[union-attr]


def test_the_decorator_settles_what_the_result_says(name: str, store: Store) -> None:
    """An OpenAI-shaped answer's usage.total_tokens settles the reservation."""
    breaker = make(name, store, Limit(tokens="1000/m", estimate=500))

    @breaker
    def chat() -> dict[str, object]:
        return {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 30}}

    chat()
    chat()
    assert breaker.status().limit.tokens_available == 900  # type: ignore[union-attr]


def test_report_tokens_settles_from_inside_the_call(name: str, store: Store) -> None:
    """report_tokens() inside a guarded call beats what the result says."""
    breaker = make(name, store, Limit(tokens="1000/m", estimate=lambda args, kwargs: args[0]))

    @breaker
    def generate(budget: int) -> dict[str, object]:
        report_tokens(7)
        return {"usage": {"total_tokens": 999}}

    generate(300)
    assert breaker.status().limit.tokens_available == 993  # type: ignore[union-attr]
    with pytest.raises(PolicyError, match="outside a call guarded"):
        report_tokens(1)


def test_tokens_of_reads_the_shapes_servers_answer_with() -> None:
    """OpenAI (objects and dicts) and TGI's details; None when nothing says."""

    class Usage:
        total_tokens = 42

    class Completion:
        usage = Usage()

    assert tokens_of(Completion()) == 42
    assert tokens_of({"usage": {"total_tokens": 5}}) == 5
    assert tokens_of({"details": {"generated_tokens": 9}}) == 9
    assert tokens_of({"label": "setosa"}) is None
    assert tokens_of({"usage": {"total_tokens": -1}}) is None


# -- with the circuit ---------------------------------------------------------------------


def test_a_refused_call_is_not_a_failure(name: str, store: Store) -> None:
    """Refusals by the limit never count toward opening the circuit, and are events."""
    breaker = make(name, store, Limit(concurrency=1), failure_threshold=2)
    seen: list[CallRejected] = []
    breaker.events.subscribe(lambda e: seen.append(e) if isinstance(e, CallRejected) else None)
    held = breaker.admit()
    for _ in range(5):
        refused(breaker)
    breaker.record(held, Outcome.SUCCESS)
    assert breaker.state is State.CLOSED
    assert [e.by for e in seen] == ["concurrency"] * 5


def test_a_failed_call_still_counts_and_gives_its_slot_back(name: str, store: Store) -> None:
    """Under a limit, failures open the circuit as ever; their slots come back."""
    breaker = make(name, store, Limit(concurrency=1), failure_threshold=2)
    for _ in range(2):
        with pytest.raises(EndpointDown):
            breaker.call(lambda: (_ for _ in ()).throw(EndpointDown("503")))
    assert breaker.state is State.OPEN
    with pytest.raises(CircuitOpenError):
        breaker.admit()
    assert breaker.status().limit.in_flight == 0  # type: ignore[union-attr]


def test_a_probe_the_limit_refuses_gives_its_probe_slot_back(
    name: str, store: Store, clock: FakeClock
) -> None:
    """Half-open with every slot held by a straggler: the probe is refused by the limit and
    another caller may probe once the straggler is done."""
    breaker = make(name, store, Limit(concurrency=1), failure_threshold=1, open_seconds=1)
    straggler = breaker.admit()  # admitted while closed, still running
    breaker.record(None, Outcome.FAILURE)  # another call's failure (it held no slot) trips it
    assert breaker.state is State.OPEN
    clock.advance(1)
    assert refused(breaker).kind == "concurrency"
    assert breaker.status().probes_in_use == 0  # type: ignore[union-attr]
    breaker.record(straggler, Outcome.SUCCESS)  # a late outcome: not a probe's
    probe = breaker.admit()
    assert probe is not None and probe.probe_id is not None
    breaker.record(probe, Outcome.SUCCESS)
    assert breaker.state is State.CLOSED


def test_shadow_mode_admits_past_the_limit(name: str, store: Store) -> None:
    """Disabled (shadow mode): the limit, like the circuit, only watches."""
    breaker = make(name, store, Limit(concurrency=1, rate="1/s"))
    breaker.disable()
    tickets = [breaker.admit() for _ in range(3)]
    assert tickets == [None, None, None]


def test_overload_counts_as_failure_without_an_adaptive_limit(name: str, store: Store) -> None:
    """A static limit (or none) has nothing to shrink: "overloaded" opens the circuit as ever."""
    breaker = make(name, store, Limit(concurrency=4), failure_threshold=2)
    for _ in range(2):
        breaker.record(breaker.admit(), Outcome.OVERLOAD, 5.0)
    assert breaker.state is State.OPEN
    plain = CircuitBreaker(f"{name}-plain", store=store, fail_max=2)  # type: ignore[arg-type]
    plain.record(None, Outcome.OVERLOAD)
    plain.record(None, Outcome.OVERLOAD)
    assert plain.state is State.OPEN


def test_the_status_shows_the_limit(name: str, store: Store) -> None:
    """What cbtasks status reads: what it allows, in flight, the rate used, tokens left."""
    breaker = make(name, store, Limit(concurrency=8, rate="50/s", burst=10, tokens="9000/m"))
    held = [breaker.admit(tokens=100) for _ in range(3)]
    limit = breaker.status().limit  # type: ignore[union-attr]
    assert limit is not None
    assert limit.allows == "concurrency 8, rate 50/s (burst 10), tokens 9000/m"
    assert (limit.in_flight, limit.concurrency, limit.tokens_available) == (3, 8.0, 8700)
    for ticket in held:
        breaker.record(ticket, Outcome.SUCCESS)
    assert breaker.status().limit.in_flight == 0  # type: ignore[union-attr]
    assert make(f"{name}-b", store, Limit(rate=5)).status() is None  # no state yet


def test_a_reset_keeps_the_slots_of_calls_in_flight(name: str, store: Store) -> None:
    """An operator's reset forgets the circuit, not the calls still at the endpoint."""
    breaker = make(name, store, Limit(concurrency=1))
    held = breaker.admit()
    breaker.reset()
    refused(breaker)
    breaker.record(held, Outcome.SUCCESS)
    assert breaker.admit() is not None


# -- waiting (real time, one process's threads) ---------------------------------------------


def test_a_call_that_may_wait_gets_the_slot_when_it_frees() -> None:
    """wait=2: a second caller waits for the first's slot instead of failing."""
    breaker = CircuitBreaker(limit=Limit(concurrency=1, wait=2.0))
    release = threading.Event()
    threading.Thread(target=breaker.call, args=(release.wait,), daemon=True).start()
    deadline = time.monotonic() + 5
    while breaker.status() is None or not breaker.status().limit.in_flight:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    assert breaker.call(ok) == "ok"
    assert 0.15 < time.monotonic() - started < 1.5


def test_a_wait_too_short_for_the_slot_still_refuses() -> None:
    """The wait is a bound: past it, LimitExceeded."""
    breaker = CircuitBreaker(limit=Limit(concurrency=1, wait=0.05))
    held = breaker.admit()
    started = time.monotonic()
    with pytest.raises(LimitExceeded):
        breaker.call(ok)
    assert time.monotonic() - started < 0.5
    breaker.record(held, Outcome.SUCCESS)


# -- bad config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "at least one of"),
        ({"concurrency": 0}, "concurrency must be a whole number from 1"),
        ({"rate": "50/fortnight"}, "unknown period 'fortnight'"),
        ({"rate": "fifty a second"}, "rate must be like '50/s'"),
        ({"rate": -3}, "rate must be above 0"),
        ({"tokens": "0/m"}, "tokens must be above 0"),
        ({"concurrency": 2, "burst": 5}, "burst needs rate"),
        ({"rate": 5, "lease": 0}, "lease must be a number from 0.01"),
        ({"rate": 5, "wait": math.inf}, "wait must be a number"),
        ({"adaptive": True, "min_concurrency": 8, "max_concurrency": 4}, "must be at least"),
        ({"adaptive": True, "concurrency": 100, "max_concurrency": 10}, "outside"),
        ({"tokens": "10/m", "usage": 3}, "usage must be a callable"),
    ],
)
def test_bad_limits_say_what_to_change(fields: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Limit(**fields)  # type: ignore[arg-type]


def test_a_limit_from_settings_is_a_dict() -> None:
    """app.conf.cbtasks_limit holds dicts: unknown fields are named."""
    assert Limit.coerce({"concurrency": 3}) == Limit(concurrency=3)
    with pytest.raises(PolicyError, match="unknown Limit field.*'concurency'"):
        Limit.coerce({"concurency": 3}, "cbtasks_limit['model-a']")
    with pytest.raises(PolicyError, match="must be a Limit or a dict"):
        Limit.coerce(8)
