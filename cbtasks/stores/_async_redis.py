"""AsyncRedisStore: the RedisStore's shared state, for asyncio processes.

The same scripts, keys and news as :class:`RedisStore`, so an asyncio
process (a FastAPI gateway, say) and the Celery workers share one circuit.
Every round trip is awaited on ``redis.asyncio``, so a slow or frozen Redis
holds only the request that waits for it, never the event loop. The news
listener is the same daemon thread as RedisStore's, on a blocking twin of the
client: news only flips flags in the local views, which the loop reads.
"""

from __future__ import annotations

from ._connection import ASYNCIO
from ._redis_base import RedisStoreBase, awaited

__all__ = ["AsyncRedisStore"]


class AsyncRedisStore(RedisStoreBase):
    """Breaker state in Redis, for ``await breaker.acall(...)`` and ``async with breaker``.

    ``url_or_client`` is a Redis URL (as for :class:`RedisStore`) or a
    ``redis.asyncio.Redis``. Each method of the store is a coroutine; a
    breaker on this store is used through its async forms only.
    """

    _kind = ASYNCIO

    # -- the store interface: the flows of RedisStoreBase, each command awaited ----

    admit = awaited(RedisStoreBase._admit)
    record = awaited(RedisStoreBase._record)
    control = awaited(RedisStoreBase._control)
    status = awaited(RedisStoreBase._status)
    names = awaited(RedisStoreBase._names)
    claim = awaited(RedisStoreBase._claim)
    ping = awaited(RedisStoreBase._ping)

    async def aclose(self) -> None:
        """Stop the news listener and close the connections."""
        self.news.stop()
        self.news.client.close()
        await self.client.aclose()
