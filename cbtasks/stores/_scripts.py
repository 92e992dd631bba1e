"""The Lua scripts of the stores and the parking lot: read once, run one way.

Every script is a :class:`LuaScript`: run by its SHA1 (computed here, so no
round trip is spent loading it), loaded with SCRIPT LOAD only when Redis
answers NOSCRIPT (a restart, a failover, SCRIPT FLUSH), and run again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, NamedTuple

from redis.exceptions import NoScriptError

from .._machine import Transition
from ._base import Reply

_LUA = resources.files("cbtasks.stores") / "lua"

#: The first line of a file in ``lua/`` that is a script of its own (not a part loaded
#: by others): ``--! script`` alone, or ``--! script after: constants clock ...``
#: naming the parts loaded before it, in order.
SCRIPT_MARK = "--! script"


class LuaScript:
    """One script: its text and SHA1; :meth:`run` is the flow of commands that runs it."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def run(self, numkeys: int, *argv: Any) -> Generator[tuple[Any, ...], Any, Any]:
        """EVALSHA with ``numkeys`` keys then arguments in ``argv``; SCRIPT LOAD on NOSCRIPT."""
        try:
            return (yield ("EVALSHA", self.sha, numkeys, *argv))
        except NoScriptError:  # Redis restarted, failed over, or SCRIPT FLUSH
            yield ("SCRIPT LOAD", self.text)
            return (yield ("EVALSHA", self.sha, numkeys, *argv))


def scripts_in(folder: Traversable) -> dict[str, LuaScript]:
    """Every script in ``folder`` by its file's name, each its parts then its own text.

    A new operation is its file, marked on its first line: nothing here names it.
    """
    found: dict[str, LuaScript] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".lua"):
            continue
        text = entry.read_text()
        first = text.partition("\n")[0].strip()
        if not first.startswith(SCRIPT_MARK):
            continue  # a part (constants, clock, common, limit), loaded by scripts
        marked, _, after = first[len(SCRIPT_MARK) :].partition("after:")
        if marked.strip():
            raise ValueError(
                f"lua/{entry.name}: write {SCRIPT_MARK!r} or "
                f"'{SCRIPT_MARK} after: <part> ...', not {first!r}"
            )
        missing = [part for part in after.split() if not (folder / f"{part}.lua").is_file()]
        if missing:
            raise ValueError(f"lua/{entry.name}: no part named {', '.join(missing)} in lua/")
        parts = [(folder / f"{part}.lua").read_text() for part in after.split()]
        found[entry.name.removesuffix(".lua")] = LuaScript("\n".join([*parts, text]))
    return found


#: Every script, by name: the machine's operations (admit, record, status, control,
#: success), the parking lot's (park, release, ack) and the pause gate's lease.
SCRIPTS = scripts_in(_LUA)
#: The breaker machine's operations (and the rest, by the same names).
MACHINE_SCRIPTS = SCRIPTS


# The replies' layouts, as the scripts write them (common.lua's finish(), and
# each operation's head and tail around it), read here by name.


class Finish(NamedTuple):
    """What common.lua's finish() puts after an operation's head; the transitions follow,
    three items each (from, to, reason)."""

    state: int
    remaining_ms: int
    mode: int
    version: int
    now_ms: int


class AdmitHead(NamedTuple):
    """admit.lua's reply before its Finish."""

    admitted: int
    is_probe: int
    retry_after_ms: int
    refused_by: int
    delay_ms: int


class StatusTail(NamedTuple):
    """status.lua's reply after the Finish and the transitions (it has a head: exists)."""

    trips: int
    consecutive: int
    calls: int
    failures: int
    slow: int
    probes: int
    open_until: int
    last_failure: bytes
    trips_total: int


class LimitTail(NamedTuple):
    """status.lua's reply after the StatusTail: the breaker's limit."""

    wire: bytes
    in_flight: int
    concurrency: bytes
    admitted_last_second: int
    tokens_available: int


class SuccessReply(NamedTuple):
    """success.lua's reply outside a closed circuit (closed: one integer, version * 4 + mode)."""

    state: int
    remaining_ms: int
    mode: int
    version: int
    now_ms: int


def machine_reply(
    raw: list[Any],
    head: int = 0,
    admitted: bool = True,
    probe_id: str | None = None,
    retry_after_ms: int = 0,
) -> Reply:
    """A machine script's reply: its Finish after ``head`` items, then the transitions."""
    finish = Finish(*raw[head : head + len(Finish._fields)])
    rest = raw[head + len(Finish._fields) :]
    transitions: tuple[Transition, ...] = tuple(
        (rest[i], rest[i + 1], rest[i + 2].decode()) for i in range(0, len(rest) - 2, 3)
    )
    return Reply(admitted, probe_id, retry_after_ms, *finish, transitions)


def admit_reply(raw: list[Any], probe_id: str) -> Reply:
    """admit.lua's reply: the AdmitHead, then the machine's."""
    head = AdmitHead(*raw[: len(AdmitHead._fields)])
    reply = machine_reply(
        raw,
        len(AdmitHead._fields),
        bool(head.admitted),
        probe_id if head.is_probe else None,
        head.retry_after_ms,
    )
    if head.refused_by or head.delay_ms:
        return reply._replace(refused_by=head.refused_by, delay_ms=head.delay_ms)
    return reply


def status_reply(raw: list[Any]) -> tuple[bool, Finish, StatusTail, LimitTail]:
    """status.lua's reply: whether the breaker has state, its Finish, its counters, its limit."""
    finish = Finish(*raw[1 : 1 + len(Finish._fields)])
    limit = LimitTail(*raw[-len(LimitTail._fields) :])
    end = len(raw) - len(LimitTail._fields)
    return bool(raw[0]), finish, StatusTail(*raw[end - len(StatusTail._fields) : end]), limit
