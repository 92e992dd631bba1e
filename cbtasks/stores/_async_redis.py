"""AsyncRedisStore: the RedisStore's shared state, for asyncio processes.

The same scripts, keys and news as :class:`RedisStore`, so an asyncio
process (a FastAPI gateway, say) and the Celery workers share one circuit.
Every round trip is awaited on ``redis.asyncio``, so a slow or frozen Redis
holds only the request that waits for it, never the event loop. The news
listener is the same daemon thread as RedisStore's, on a blocking twin of the
client: news only flips flags in the local views, which the loop reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError

from .._errors import PolicyError, StoreUnavailableError
from .._policy import PolicyWire
from .._state import Outcome
from ._base import BreakerStatus, Reply
from ._connection import REDIS_DOWN, make_client, unreachable_message
from ._news import ProcessNews
from ._outage import OnError
from ._redis_base import SCRIPT_ERRORS, RedisStoreBase, ScriptCall
from ._scripts import MACHINE_SCRIPTS, parse_reply
from ._urls import is_multi_node, node_options, parse_multi_node

__all__ = ["AsyncRedisStore"]


class AsyncRedisStore(RedisStoreBase):
    """Breaker state in Redis, for ``await breaker.acall(...)`` and ``async with breaker``.

    ``url_or_client`` is a Redis URL (as for :class:`RedisStore`) or a
    ``redis.asyncio.Redis``. Each method of the store is a coroutine; a
    breaker on this store is used through its async forms only.
    """

    def __init__(
        self,
        url_or_client: str | aredis.Redis = "redis://localhost:6379/0",
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
        # A URL is checked (and a bad one explained) by the blocking client's maker.
        blocking = make_client(url_or_client, timeout) if isinstance(url_or_client, str) else None
        self.client = _async_client(url_or_client, timeout)
        self.news = ProcessNews(
            blocking or _blocking_twin(self.client, timeout),
            prefix,
            self._news_lost,
            retry_interval,
        )

    # -- the store interface, awaited ----------------------------------------------

    async def admit(self, name: str, policy: PolicyWire, probe_id: str) -> Reply:
        raw = await self._evalsha(name, self._machine_call("admit", name, policy, probe_id))
        return self._admit_reply(raw, name, policy, probe_id)

    async def record(
        self,
        name: str,
        policy: PolicyWire,
        probe_id: str | None,
        outcome: Outcome,
        slow: bool,
        retry_after_ms: int,
    ) -> Reply:
        call = self._record_call(name, policy, probe_id, outcome, slow, retry_after_ms)
        raw = await self._evalsha(name, call)
        return self._record_reply(
            raw, call[0], name, policy, probe_id, outcome, slow, retry_after_ms
        )

    async def control(self, name: str, policy: PolicyWire, op: str) -> Reply:
        call = self._machine_call("control", name, policy, op)
        return parse_reply(await self._evalsha(name, call, strict=True), 0)

    async def status(
        self, name: str, policy: PolicyWire, *, strict: bool = True
    ) -> BreakerStatus | None:
        """The breaker as an operator sees it; None if it has no state, or (not
        ``strict``) while Redis is unreachable, which then costs no wait."""
        call = self._machine_call("status", name, policy)
        return self._status_from(name, await self._evalsha(name, call, strict=strict))

    async def names(self) -> list[str]:
        """Every breaker with state under this store's prefix (SCAN, not KEYS)."""
        try:
            keys = [key async for key in self.client.scan_iter(match=self._names_pattern)]
        except REDIS_DOWN as exc:
            raise StoreUnavailableError(unreachable_message(self.client, exc)) from exc
        return self._names_from(keys)

    async def claim(self, name: str, what: str, ttl_ms: int) -> bool:
        key = self._claim_key(name, what)
        try:
            return bool(await self.client.set(key, os.getpid(), nx=True, px=max(1, ttl_ms)))
        except REDIS_DOWN as exc:
            self._outage(exc, name)
            return False

    async def ping(self) -> None:
        """Raise StoreUnavailableError, saying what to check, if Redis is unreachable."""
        try:
            await self.client.ping()
        except REDIS_DOWN as exc:
            raise StoreUnavailableError(unreachable_message(self.client, exc)) from exc

    async def aclose(self) -> None:
        """Stop the news listener and close the connections."""
        self.news.stop()
        self.news.client.close()
        await self.client.aclose()

    # -- internals -------------------------------------------------------------------

    async def _evalsha(self, name: str, call: ScriptCall, strict: bool = False) -> Any:
        """One script call; None while Redis is unreachable (unless ``strict``)."""
        op, argv = call
        if not strict and self._skip_redis(name):
            return None
        try:
            try:
                reply = await self.client.execute_command("EVALSHA", await self._sha(op), *argv)
            except NoScriptError:
                self._shas.pop(op, None)
                reply = await self.client.execute_command("EVALSHA", await self._sha(op), *argv)
        except SCRIPT_ERRORS as exc:
            self._failed(exc, op, name, strict)
            return None
        self._succeeded(name)
        return reply

    async def _sha(self, op: str) -> str:
        sha = self._shas.get(op)
        if sha is None:
            sha = self._shas[op] = await self.client.script_load(MACHINE_SCRIPTS[op])
        return sha


def _async_client(url_or_client: Any, timeout: float) -> Any:
    """An asyncio client for ``url_or_client`` whose calls give up after ``timeout`` seconds."""
    if isinstance(url_or_client, aredis.Redis | AsyncRedisCluster):
        return url_or_client
    if not isinstance(url_or_client, str):
        raise PolicyError(
            "AsyncRedisStore needs a Redis URL, a redis.asyncio.Redis or RedisCluster client, "
            f"got {type(url_or_client).__name__}"
        )
    limits: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": AsyncRetry(NoBackoff(), 0),
    }
    if is_multi_node(url_or_client):
        url = parse_multi_node(url_or_client)
        options, sentinel_password = node_options(url)
        if url.kind == "cluster":
            nodes = [AsyncClusterNode(host, port) for host, port in url.nodes]
            return AsyncRedisCluster(startup_nodes=nodes, **limits, **options)
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        sentinel_kwargs["password"] = sentinel_password
        sentinel = AsyncSentinel(list(url.nodes), sentinel_kwargs=sentinel_kwargs, **limits)  # type: ignore[no-untyped-call]
        return sentinel.master_for(str(url.service), db=url.db, **options)
    return aredis.Redis.from_url(
        url_or_client,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=AsyncRetry(NoBackoff(), 0),  # on_error decides, rather than retries stalling
        health_check_interval=30,
    )


# What a blocking client needs to reach the server an asyncio client reaches.
_TWIN_KEYS = ("host", "port", "db", "path", "username", "password", "credential_provider")


def _blocking_twin(client: Any, timeout: float) -> Any:
    """A blocking client to the same server as ``client``, for the news thread."""
    if isinstance(client, AsyncRedisCluster):
        nodes = client.nodes_manager.startup_nodes.values()
        twin = [ClusterNode(node.host, node.port) for node in nodes]  # type: ignore[no-untyped-call]
        kwargs = client.connection_kwargs
        return make_client(
            RedisCluster(
                startup_nodes=twin, username=kwargs.get("username"), password=kwargs.get("password")
            ),
            timeout,
        )
    pool = client.connection_pool
    kwargs = {
        key: value
        for key, value in pool.connection_kwargs.items()
        if key in _TWIN_KEYS or key.startswith("ssl_")
    }
    connection_class = getattr(redis.connection, pool.connection_class.__name__, redis.Connection)
    return redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=connection_class,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            **kwargs,
        )
    )
