"""The parking lot: deferred requests kept in Redis, not in worker memory.

One sorted set per breaker, scored by when each request was parked, so
release is oldest first; the messages themselves in a hash beside it. All
keys share the breaker's hash tag. Release is one script (``release.lua``):
it hands each request to exactly one releaser at the pace the breaker
allows (none while open, one per probe interval while it may probe, a slow
start once closed), under a lease so a releaser that dies loses nothing.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import redis

from ._keys import breaker_keys, parked_channel
from ._redis import drive
from ._scripts import SCRIPTS, LuaScript

__all__ = ["ParkingLot", "Released"]


class Released(NamedTuple):
    """What one release step handed out, and how long until the next may hand out more."""

    #: (request id, message) pairs to re-publish, then :meth:`ParkingLot.ack`.
    requests: list[tuple[str, dict[str, Any]]]
    #: Seconds until more may go (0: now), or None: not until news (or a re-check).
    wait: float | None
    #: (request id, message) pairs whose ``expires`` passed: gone from the lot.
    expired: list[tuple[str, dict[str, Any]]]


class ParkingLot:
    """The parked requests of one breaker."""

    def __init__(self, client: redis.Redis, prefix: str, breaker: str) -> None:
        keys = breaker_keys(prefix, breaker)
        self.client = client
        self.breaker = breaker
        self._parked, self._data = keys.parked, keys.parked_data
        self._releasing, self._ramp = keys.releasing, keys.release_ramp
        self._state = keys.state
        self._expiries = keys.parked_expires
        self._dead = keys.parked_dead
        self._wake_channel = parked_channel(prefix)

    def park(
        self,
        request_id: str,
        message: dict[str, Any],
        now: float | None = None,
        expires_at: float | None = None,
    ) -> int:
        """Keep ``message`` until the circuit closes, or until ``expires_at`` (epoch seconds).

        Returns how many are parked.
        """
        keys = [self._parked, self._data, self._expiries]
        args = [
            request_id,
            json.dumps(message),
            _ms(now),
            self._wake_channel,
            self.breaker,
            _ms(expires_at),
        ]
        return int(self._run(SCRIPTS["park"], keys, args))

    def release(
        self,
        rate: float,
        max_rate: float = math.inf,
        lease_seconds: float = 30.0,
        probe_interval: float = 1.0,
        most: int = 100,
        now: float | None = None,
    ) -> Released:
        """Hand out what may go now: see the module's docstring for the pace.

        ``rate`` is where the slow start begins (per second), ``max_rate`` where
        it stops growing; ``now`` (seconds) replaces Redis's clock in tests.
        """
        keys = [
            self._parked,
            self._data,
            self._releasing,
            self._state,
            self._ramp,
            self._expiries,
        ]
        cap = 0 if math.isinf(max_rate) else max_rate
        args: list[str | int] = [
            repr(float(rate)),
            repr(float(cap)),
            int(lease_seconds * 1000),
            _ms(now),
            int(probe_interval * 1000),
            most,
        ]
        raw = self._run(SCRIPTS["release"], keys, args)
        wait_ms, expired_count = int(raw[0]), int(raw[1])
        pairs = [(raw[i].decode(), raw[i + 1]) for i in range(2, len(raw), 2)]
        expired = [(rid, self._read(rid, data)) for rid, data in pairs[:expired_count]]
        out = []
        for request_id, data in pairs[expired_count:]:
            message = self._read(request_id, data)
            if message is not None:  # else _read put it among the dead letters
                out.append((request_id, message))
        return Released(
            out,
            None if wait_ms < 0 else wait_ms / 1000,
            [(rid, message) for rid, message in expired if message is not None],
        )

    def _read(self, request_id: str, data: bytes) -> dict[str, Any] | None:
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.dead_letter(request_id, data.decode(errors="replace"), "not a JSON object")
            return None
        return message

    def dead_letter(self, request_id: str, message: Any, reason: str) -> None:
        """Keep a request that cannot be released where an operator sees it, and drop it here.

        ``cbtasks status`` counts them; they stay until deleted by hand.
        """
        record = json.dumps({"reason": reason, "message": message}, default=str)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self._dead, request_id, record)
        pipe.zrem(self._releasing, request_id)
        pipe.zrem(self._parked, request_id)
        pipe.zrem(self._expiries, request_id)
        pipe.hdel(self._data, request_id)
        pipe.execute()

    def dead_letters(self) -> dict[str, dict[str, Any]]:
        """The requests put aside by :meth:`dead_letter`, by request id."""
        raw = self.client.hgetall(self._dead)
        return {
            (key.decode() if isinstance(key, bytes) else key): json.loads(value)
            for key, value in raw.items()
        }

    def dead_count(self) -> int:
        """How many requests were put aside."""
        return int(self.client.hlen(self._dead))

    def ack(self, request_ids: list[str]) -> None:
        """These were re-published: forget them."""
        if request_ids:
            self._run(SCRIPTS["ack"], [self._releasing, self._data, self._parked], request_ids)

    def _run(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        return drive(self.client, script.run(len(keys), *keys, *args))

    def count(self) -> int:
        """Requests parked or being released."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self._parked)
        pipe.zcard(self._releasing)
        parked, releasing = pipe.execute()
        return int(parked) + int(releasing)


def _ms(now: float | None) -> str:
    return "" if now is None else str(int(now * 1000))
