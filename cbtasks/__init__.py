"""cbtasks: a circuit breaker for Celery tasks that call ML model endpoints.

The state of each breaker is shared by every worker process on every host
through Redis; a task base class defers or falls back while a circuit is open.
"""

from ._breaker import CircuitBreaker
from ._classify import Classifier, default_classify, retry_hint
from ._errors import (
    CallerError,
    CBTasksError,
    CircuitOpenError,
    EndpointError,
    EndpointFailure,
    PolicyError,
    StoreError,
    StoreUnavailableError,
)
from ._policy import BreakerPolicy, CountWindow, TimeWindow
from ._state import Outcome, State, StateChange
from .stores import AsyncRedisStore, BreakerStatus, MemoryStore, OnError, RedisStore, Store
from .task import CircuitBreakerTask

__all__ = [
    "AsyncRedisStore",
    "BreakerPolicy",
    "BreakerStatus",
    "CBTasksError",
    "CallerError",
    "CircuitBreaker",
    "CircuitBreakerTask",
    "CircuitOpenError",
    "Classifier",
    "CountWindow",
    "EndpointError",
    "EndpointFailure",
    "MemoryStore",
    "OnError",
    "Outcome",
    "PolicyError",
    "RedisStore",
    "State",
    "StateChange",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "TimeWindow",
    "default_classify",
    "retry_hint",
]
