"""What an operator reads of every breaker: one pass for the CLI, the metrics and batch.

An operator's read or command sends :data:`OPERATOR_POLICY`: the scripts need
a policy, and nothing an operator reads or does depends on which (a close
clears every window bucket whatever policy it sends).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .._errors import StoreError, StoreUnavailableError
from .._policy import BreakerPolicy
from ..stores import RedisStore
from ..stores._base import BreakerStatus
from ..stores._keys import breaker_keys
from ..stores._parking import ParkingLot

#: The policy an operator's reads and commands send (see the module's docstring).
OPERATOR_POLICY = BreakerPolicy().wire()


@dataclass(frozen=True, slots=True)
class BreakerRead:
    """One breaker as an operator reads it: its status, or why it could not be read."""

    name: str
    status: BreakerStatus | None
    lot: ParkingLot
    #: Set when the breaker's state is corrupt; ``status`` is then None.
    error: str | None = None
    #: Workers that paused the breaker's queue (defer="pause") while it is open.
    paused: int = 0
    #: Messages waiting in its paused queue, as a paused worker last counted them.
    backlog: int | None = None


def read_fleet(store: RedisStore) -> Iterator[BreakerRead]:
    """Every breaker with state in ``store``; a corrupt one is read as such, the rest still are.

    StoreUnavailableError when Redis cannot be reached: the caller says so.
    """
    for name in store.names():
        lot = ParkingLot(store.client, store.prefix, name)
        try:
            status = store.status(name, OPERATOR_POLICY)
        except StoreUnavailableError:
            raise
        except StoreError as exc:  # one corrupt breaker: show it, and the rest
            yield BreakerRead(name, None, lot, str(exc))
            continue
        if status is not None:
            paused = paused_workers(store, name)
            backlog = store.client.get(breaker_keys(store.prefix, name).backlog) if paused else None
            yield BreakerRead(
                name, status, lot, paused=paused, backlog=None if backlog is None else int(backlog)
            )


def paused_workers(store: RedisStore, name: str) -> int:
    """How many workers have breaker ``name``'s queue paused now (their notes not run out)."""
    now_ms = int(time.time() * 1000)
    return int(store.client.zcount(breaker_keys(store.prefix, name).paused, now_ms, "+inf"))


def known_breaker(store: RedisStore, name: str) -> str | None:
    """None if ``name`` has state in ``store``, else a message naming the breakers there are."""
    known = store.names()
    if name in known:
        return None
    return f"no breaker named {name!r} (known: {', '.join(known) or 'none yet'})"


def recent_waits(store: RedisStore, breaker: str, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` requests that waited for ``breaker`` and then ran, newest first."""
    raw = store.client.zrevrange(breaker_keys(store.prefix, breaker).waited, 0, limit - 1)
    entries = []
    for item in raw:
        try:
            entries.append(dict(json.loads(item)))
        except (ValueError, TypeError):  # not ours: skip, as news does
            continue
    return entries
