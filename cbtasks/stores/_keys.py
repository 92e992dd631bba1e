"""Every Redis key and channel cbtasks uses, built in one place.

A breaker's keys share the hash tag ``{name}``, so they live on one Redis
Cluster slot and one script can touch them all:

- ``<prefix>:{name}:s`` the state hash (the limit's fields too), ``:r`` the
  count window's ring, ``:p`` the probe leases, ``:c`` the limit's slots
  (calls in flight), ``:h`` its history (a capped stream of transitions and
  operators' commands), ``:claim:<what>`` a fleet-wide turn;
- ``:parked`` the parked requests by due time, ``:parked:data`` their
  messages, ``:parked:expires`` their expiry, ``:parked:dead`` the poison
  ones, ``:releasing`` the leases of releases in flight, ``:release-ramp``
  the slow start;
- ``:waited`` the requests that waited and then ran; ``:paused`` the workers
  that paused the breaker's queue (defer="pause"), ``:claim:consume:<queue>``
  the half-open consumer's lease, ``:backlog`` the paused queue's waiting messages.

Outside any breaker: ``<prefix>:news`` and ``<prefix>:parked`` (channels),
``<prefix>:done:<task id>`` (the completion guard).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ._base import validate_name

#: The prefix of every key, unless a store (or app.conf.cbtasks_prefix) says otherwise.
DEFAULT_PREFIX = "cbtasks"


@dataclass(frozen=True, slots=True)
class BreakerKeys:
    """The keys of one breaker under one prefix."""

    prefix: str
    name: str

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.name}}}"

    @property
    def state(self) -> str:
        return f"{self.base}:s"

    @property
    def ring(self) -> str:
        return f"{self.base}:r"

    @property
    def probes(self) -> str:
        return f"{self.base}:p"

    @property
    def slots(self) -> str:
        return f"{self.base}:c"

    @property
    def history(self) -> str:
        return f"{self.base}:h"

    def claim(self, what: str) -> str:
        return f"{self.base}:claim:{what}"

    @property
    def parked(self) -> str:
        return f"{self.base}:parked"

    @property
    def parked_data(self) -> str:
        return f"{self.base}:parked:data"

    @property
    def parked_expires(self) -> str:
        return f"{self.base}:parked:expires"

    @property
    def parked_dead(self) -> str:
        return f"{self.base}:parked:dead"

    @property
    def releasing(self) -> str:
        return f"{self.base}:releasing"

    @property
    def release_ramp(self) -> str:
        return f"{self.base}:release-ramp"

    @property
    def waited(self) -> str:
        return f"{self.base}:waited"

    @property
    def paused(self) -> str:
        return f"{self.base}:paused"

    @property
    def backlog(self) -> str:
        return f"{self.base}:backlog"


@functools.lru_cache(maxsize=4096)
def breaker_keys(prefix: str, name: str) -> BreakerKeys:
    """The keys of breaker ``name`` (a name that cannot be one raises PolicyError)."""
    return BreakerKeys(prefix, validate_name(name))


def news_channel(prefix: str) -> str:
    """Where every state change is published."""
    return f"{prefix}:news"


def parked_channel(prefix: str) -> str:
    """Where a parking lot that was empty announces its first request."""
    return f"{prefix}:parked"


def done_key(prefix: str, task_id: str) -> str:
    """The completion guard's mark of a task id."""
    return f"{prefix}:done:{task_id}"


def state_keys_pattern(prefix: str) -> str:
    """A SCAN pattern matching every breaker's state hash."""
    return f"{prefix}:{{*}}:s"


def name_of_state_key(prefix: str, key: bytes | str) -> str:
    """The breaker whose state hash ``key`` is."""
    text = key.decode() if isinstance(key, bytes) else key
    return text[len(prefix) + 2 : -3]
