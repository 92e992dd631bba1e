"""RedisStore: one breaker state shared by every process on every host.

Each operation is one Lua script run with EVALSHA: one round trip, atomic,
timed by Redis's own clock (``TIME``), so hosts whose clocks disagree still
agree on when a circuit reopens. Keys are hash-tagged per breaker
(``cbtasks:{name}:s``) so every key of one breaker lives on one Redis Cluster
slot. A state change is published on ``<prefix>:news``; each process listens
in a background thread and updates its local views within milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from .._errors import StoreError, StoreUnavailableError
from .._policy import PolicyWire
from .._state import Outcome
from ._base import BreakerStatus, Reply
from ._connection import REDIS_DOWN, describe_client, make_client, unreachable_message
from ._news import ProcessNews
from ._outage import OnError
from ._redis_base import SCRIPT_ERRORS, RedisStoreBase, ScriptCall
from ._scripts import MACHINE_SCRIPTS, parse_reply

__all__ = ["RedisStore"]


class RedisStore(RedisStoreBase):
    """Keeps breaker state in Redis, shared by every process that uses it.

    ``url_or_client`` is a ``redis://``, ``rediss://`` (TLS) or ``unix://``
    URL, credentials and TLS options included, or a ready ``redis.Redis``.
    ``timeout`` bounds every Redis call (seconds), so an outage never stalls
    a guarded call for long; ``on_error`` (an :class:`OnError` or its value)
    says what breakers do meanwhile. Redis is tried again every
    ``retry_interval`` seconds; until then calls skip it.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis = "redis://localhost:6379/0",
        *,
        prefix: str = "cbtasks",
        on_error: OnError | str = OnError.LOCAL,
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(
            prefix=prefix,
            on_error=on_error,
            timeout=timeout,
            retry_interval=retry_interval,
            clock=clock,
        )
        self.client = make_client(url_or_client, timeout)
        #: This process's views of the breakers; news makes them ask again.
        self.news = ProcessNews(self.client, prefix, self._news_lost, retry_interval)

    # -- the Store interface -------------------------------------------------

    def admit(self, name: str, policy: PolicyWire, probe_id: str) -> Reply:
        raw = self._evalsha(name, self._machine_call("admit", name, policy, probe_id))
        return self._admit_reply(raw, name, policy, probe_id)

    def record(
        self,
        name: str,
        policy: PolicyWire,
        probe_id: str | None,
        outcome: Outcome,
        slow: bool,
        retry_after_ms: int,
    ) -> Reply:
        call = self._record_call(name, policy, probe_id, outcome, slow, retry_after_ms)
        raw = self._evalsha(name, call)
        return self._record_reply(
            raw, call[0], name, policy, probe_id, outcome, slow, retry_after_ms
        )

    def control(self, name: str, policy: PolicyWire, op: str) -> Reply:
        raw = self._evalsha(name, self._machine_call("control", name, policy, op), strict=True)
        return parse_reply(raw, 0)

    def status(self, name: str, policy: PolicyWire) -> BreakerStatus | None:
        return self._status_from(
            name, self._evalsha(name, self._machine_call("status", name, policy), strict=True)
        )

    def names(self) -> list[str]:
        """Every breaker with state under this store's prefix (SCAN, not KEYS)."""
        try:
            return self._names_from(
                list(self.client.scan_iter(match=self._names_pattern, count=500))
            )
        except REDIS_DOWN as exc:
            raise StoreUnavailableError(unreachable_message(self.client, exc)) from exc

    def claim(self, name: str, what: str, ttl_ms: int) -> bool:
        key = self._claim_key(name, what)
        try:
            return bool(self.client.set(key, os.getpid(), nx=True, px=max(1, ttl_ms)))
        except REDIS_DOWN as exc:
            self._outage(exc, name)
            return False

    # -- operations ------------------------------------------------------------

    def ping(self) -> None:
        """Raise StoreUnavailableError, saying what to check, if Redis is unreachable."""
        try:
            self.client.ping()
        except REDIS_DOWN as exc:
            raise StoreUnavailableError(unreachable_message(self.client, exc)) from exc
        except redis.RedisError as exc:
            raise StoreError(
                f"Redis at {describe_client(self.client)} refused PING: {exc}"
            ) from exc

    def refuse_one_cluster_node(self) -> None:
        """StoreError if a plain URL names one node of a Redis Cluster (it holds only some
        breakers): the URL should be ``redis+cluster://``."""
        if isinstance(self.client, RedisCluster):
            return
        try:
            enabled = self.client.info("cluster").get("cluster_enabled")
        except redis.RedisError:
            return
        if enabled:
            raise StoreError(
                f"{describe_client(self.client)} is a node of a Redis Cluster: use "
                "redis+cluster://host:port[,host:port...] to reach every node's breakers"
            )

    def close(self) -> None:
        """Stop the news listener and close the connections."""
        self.news.stop()
        self.client.close()

    # -- internals -------------------------------------------------------------

    def _evalsha(self, name: str, call: ScriptCall, strict: bool = False) -> Any:
        """One script call; None while Redis is unreachable (unless ``strict``)."""
        op, argv = call
        if not strict and self._skip_redis(name):
            return None
        try:
            try:
                reply = self.client.execute_command("EVALSHA", self._sha(op), *argv)
            except NoScriptError:
                self._shas.pop(op, None)
                reply = self.client.execute_command("EVALSHA", self._sha(op), *argv)
        except SCRIPT_ERRORS as exc:
            self._failed(exc, op, name, strict)
            return None
        self._succeeded(name)
        return reply

    def _sha(self, op: str) -> str:
        sha = self._shas.get(op)
        if sha is None:
            sha = self._shas[op] = self.client.script_load(MACHINE_SCRIPTS[op])
        return sha
