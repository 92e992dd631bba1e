"""The Lua scripts of the stores and the parking lot, read once from ``stores/lua``."""

from __future__ import annotations

from importlib import resources

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
