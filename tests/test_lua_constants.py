"""The numbers both machines name hold the same values in Python and in Lua."""

from __future__ import annotations

import re
from importlib import resources

from cbtasks import _machine
from cbtasks._state import CODE_BY_STATE, Mode, State
from cbtasks.stores._scripts import MACHINE_SCRIPTS

CONSTANTS = (resources.files("cbtasks.stores") / "lua" / "constants.lua").read_text()


def lua_constants() -> dict[str, int]:
    """Every `local A, B = 1, 2` in constants.lua, by name."""
    named: dict[str, int] = {}
    for names, values in re.findall(r"^local ([\w, ]+) = ([\d, ]+)$", CONSTANTS, re.MULTILINE):
        pairs = zip(names.split(","), values.split(","), strict=True)
        named.update({name.strip(): int(value) for name, value in pairs})
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


def test_no_script_spells_a_state_or_a_mode_as_a_bare_number() -> None:
    """A comparison with a literal state or mode code in a script is a constant not named."""
    bare = re.compile(r"\b(state|mode|S\.st|S\.md)\s*[=~]=\s*\d")
    for op, script in MACHINE_SCRIPTS.items():
        assert not bare.search(script.text), op
    for name in ("park", "release", "ack"):
        text = (resources.files("cbtasks.stores") / "lua" / f"{name}.lua").read_text()
        assert not bare.search(text), name
