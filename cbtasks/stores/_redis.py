"""RedisStore: one breaker state shared by every process on every host.

Each operation is one Lua script run with EVALSHA: one round trip, atomic,
timed by Redis's own clock (``TIME``), so hosts whose clocks disagree still
agree on when a circuit reopens. Keys are hash-tagged per breaker
(``cbtasks:{name}:s``) so every key of one breaker lives on one Redis Cluster
slot. A state change is published on ``<prefix>:news``; each process listens
in a background thread and updates its local views within milliseconds.
"""

from __future__ import annotations

import redis
from redis.cluster import RedisCluster

from .._errors import StoreError
from ._connection import BLOCKING, describe_client
from ._redis_base import RedisStoreBase, blocking

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

    _kind = BLOCKING

    # -- the Store interface: the flows of RedisStoreBase, driven blocking ---------

    admit = blocking(RedisStoreBase._admit)
    record = blocking(RedisStoreBase._record)
    control = blocking(RedisStoreBase._control)
    status = blocking(RedisStoreBase._status)
    names = blocking(RedisStoreBase._names)
    claim = blocking(RedisStoreBase._claim)
    ping = blocking(RedisStoreBase._ping)

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

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
