"""The Lua scripts of the stores and the parking lot, read once from ``stores/lua``."""

from __future__ import annotations

from importlib import resources
from typing import Any

from .._machine import Transition
from ._base import Reply

_LUA = resources.files("cbtasks.stores") / "lua"


def lua(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return (_LUA / f"{name}.lua").read_text()


CLOCK = lua("clock")
_MACHINE = CLOCK + lua("common")

#: The breaker machine's operations, each the machine plus its own part.
MACHINE_SCRIPTS = {op: _MACHINE + "\n" + lua(op) for op in ("admit", "record", "control", "status")}
# The healthy path's script does without the machine: only the clock.
MACHINE_SCRIPTS["success"] = CLOCK + lua("success")


def parse_reply(
    raw: list[Any],
    at: int,
    admitted: bool = True,
    probe_id: str | None = None,
    retry_after_ms: int = 0,
) -> Reply:
    """A machine script's reply from position ``at``: state, remaining, mode, version,
    now, then (from, to, reason) for each transition."""
    state, remaining, mode, version, now = raw[at : at + 5]
    rest = raw[at + 5 :]
    transitions: tuple[Transition, ...] = tuple(
        (rest[i], rest[i + 1], rest[i + 2].decode()) for i in range(0, len(rest) - 2, 3)
    )
    return Reply(
        admitted, probe_id, retry_after_ms, state, remaining, mode, version, now, transitions
    )
