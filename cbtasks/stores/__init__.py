"""Where breakers keep their state: one process (MemoryStore) or a fleet (RedisStore)."""

from ._base import BreakerStatus, Store
from ._memory import MemoryStore
from ._redis import OnError, RedisStore

__all__ = ["BreakerStatus", "MemoryStore", "OnError", "RedisStore", "Store"]
