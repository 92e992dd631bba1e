"""Where breakers keep their state: one process (MemoryStore) or a fleet (RedisStore)."""

from ._base import BreakerStatus, Store
from ._memory import MemoryStore
from ._outage import OnError
from ._redis import AsyncRedisStore, RedisStore

__all__ = ["AsyncRedisStore", "BreakerStatus", "MemoryStore", "OnError", "RedisStore", "Store"]
