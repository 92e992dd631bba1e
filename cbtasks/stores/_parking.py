"""The parking lot: deferred requests kept in Redis, not in worker memory.

One sorted set per breaker, scored by when each request was parked, so
release is oldest first; the messages themselves in a hash beside it. All
keys share the breaker's hash tag. Release is one script: it hands each
request to exactly one releaser, only while the circuit is closed, at a
bounded rate, under a lease so a releaser that dies loses nothing.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import redis

__all__ = ["ParkingLot"]

_LUA = resources.files("cbtasks.stores") / "lua"
_CLOCK = (_LUA / "clock.lua").read_text()


class ParkingLot:
    """The parked requests of one breaker."""

    def __init__(self, client: redis.Redis, prefix: str, breaker: str) -> None:
        base = f"{prefix}:{{{breaker}}}"
        self.client = client
        self.breaker = breaker
        self._parked, self._data = f"{base}:parked", f"{base}:parked:data"
        self._releasing, self._bucket = f"{base}:releasing", f"{base}:release-rate"
        self._state = f"{base}:s"
        self._park = client.register_script(_CLOCK + (_LUA / "park.lua").read_text())
        self._release = client.register_script(_CLOCK + (_LUA / "release.lua").read_text())
        self._ack = client.register_script((_LUA / "ack.lua").read_text())

    def park(self, request_id: str, message: dict[str, Any]) -> int:
        """Keep ``message`` until the circuit closes; returns how many are parked."""
        keys = [self._parked, self._data]
        return int(self._park(keys=keys, args=[request_id, json.dumps(message), ""]))

    def release(
        self, rate: float, burst: int, lease_seconds: float, probe_interval: float = 1.0
    ) -> list[tuple[str, dict[str, Any]]]:
        """Requests to re-publish now: up to ``rate`` a second while the circuit is closed,
        one every ``probe_interval`` seconds while it may probe, none while it is open."""
        keys = [self._parked, self._data, self._releasing, self._state, self._bucket]
        args: list[float | str] = [
            rate,
            burst,
            int(lease_seconds * 1000),
            "",
            int(probe_interval * 1000),
        ]
        raw = self._release(keys=keys, args=args)
        out = []
        for i in range(0, len(raw), 2):
            request_id = raw[i].decode()
            try:
                out.append((request_id, json.loads(raw[i + 1])))
            except ValueError:
                # Unreadable: keep it visible for an operator rather than drop it.
                self.client.hset(f"{self._data}:unreadable", request_id, raw[i + 1])
                self.ack([request_id])
        return out

    def ack(self, request_ids: list[str]) -> None:
        """These were re-published: forget them."""
        if request_ids:
            self._ack(keys=[self._releasing, self._data, self._parked], args=request_ids)

    def count(self) -> int:
        """Requests parked or being released."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self._parked)
        pipe.zcard(self._releasing)
        parked, releasing = pipe.execute()
        return int(parked) + int(releasing)
