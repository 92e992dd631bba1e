"""The numbers both machines name hold the same values in Python and in Lua."""

from __future__ import annotations

import re
from importlib import resources

from cbtasks import _limiter, _machine
from cbtasks._limit import CONCURRENCY, RATE, TOKENS
from cbtasks._state import CODE_BY_STATE, Mode, Outcome, State
from cbtasks.stores._scripts import MACHINE_SCRIPTS

CONSTANTS = (resources.files("cbtasks.stores") / "lua" / "constants.lua").read_text()


def lua_constants() -> dict[str, float]:
    """Every `local A, B = 1, 2.5` in constants.lua, by name."""
    named: dict[str, float] = {}
    for names, values in re.findall(r"^local ([\w, ]+) = ([\d., ]+)$", CONSTANTS, re.MULTILINE):
        pairs = zip(names.split(","), values.split(","), strict=True)
        named.update({name.strip(): float(value) for name, value in pairs})
    return named


def test_states_and_modes_have_the_same_numbers() -> None:
    """CLOSED, OPEN, HALF_OPEN and the three modes: one number each, on both sides."""
    lua = lua_constants()
    assert {s.name: lua[s.name] for s in State} == {s.name: CODE_BY_STATE[s] for s in State}
    assert {m.name: lua[m.name] for m in Mode} == {m.name: int(m) for m in Mode}
    assert (
        lua["CLOSED"],
        lua["OPEN"],
        lua["HALF_OPEN"],
    ) == (_machine.CLOSED, _machine.OPEN, _machine.HALF_OPEN)


def test_the_half_open_wait_is_the_same_number() -> None:
    """The straggler's least wait: named once per language, and equal."""
    assert lua_constants()["MIN_STRAGGLER_WAIT_MS"] == _machine.MIN_STRAGGLER_WAIT_MS


def test_the_outcomes_and_the_limits_numbers_are_the_same() -> None:
    """Outcomes, what refused a call, and every constant of the limit's arithmetic."""
    lua = lua_constants()
    assert {o.name: lua[o.name] for o in Outcome} == {o.name: int(o) for o in Outcome}
    assert (lua["BY_CONCURRENCY"], lua["BY_RATE"], lua["BY_TOKENS"]) == (CONCURRENCY, RATE, TOKENS)
    for name in (
        "MIN_WAIT_MS",
        "UNKNOWN_DURATION_MS",
        "OVERLOAD_BACKOFF",
        "LATENCY_BACKOFF",
        "GROWTH",
        "LATENCY_SMOOTHING",
        "SMOOTHING_CALLS",
        "PROBE_INTERVAL_MS",
        "PROBE_CALLS",
    ):
        assert lua[name] == getattr(_limiter, name), name


def test_no_script_spells_a_state_or_a_mode_as_a_bare_number() -> None:
    """A comparison with a literal state or mode code in a script is a constant not named."""
    bare = re.compile(r"\b(state|mode|S\.st|S\.md)\s*[=~]=\s*\d")
    for op, script in MACHINE_SCRIPTS.items():
        assert not bare.search(script.text), op
    for name in ("park", "release", "ack", "limit"):
        text = (resources.files("cbtasks.stores") / "lua" / f"{name}.lua").read_text()
        assert not bare.search(text), name
