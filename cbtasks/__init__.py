"""cbtasks: a circuit breaker for Celery tasks that call ML model endpoints.

The state of each breaker is shared by every worker process on every host
through Redis; a task base class defers or falls back while a circuit is open.
"""

import importlib.metadata as _metadata
import inspect as _inspect

from ._breaker import CircuitBreaker, Ticket, report_tokens
from ._classify import Classifier, default_classify, retry_hint
from ._errors import (
    CallerError,
    CallRefused,
    CBTasksError,
    CircuitOpenError,
    EndpointBusy,
    EndpointError,
    EndpointFailure,
    LimitExceeded,
    PolicyError,
    StoreError,
    StoreUnavailableError,
)
from ._events import (
    CallRecorded,
    CallRejected,
    Events,
    FallbackServed,
    HealthChecked,
    RequestDeferred,
    RequestFailed,
    RequestWaited,
)
from ._limit import Limit, tokens_of
from ._policy import BreakerPolicy, CountWindow, TimeWindow
from ._state import Outcome, State, StateChange
from .stores import AsyncRedisStore, BreakerStatus, MemoryStore, OnError, RedisStore, Store
from .task import CircuitBreakerTask

__all__ = [
    "AsyncRedisStore",
    "BreakerPolicy",
    "BreakerStatus",
    "CBTasksError",
    "CallRecorded",
    "CallRefused",
    "CallRejected",
    "CallerError",
    "CircuitBreaker",
    "CircuitBreakerTask",
    "CircuitOpenError",
    "Classifier",
    "CountWindow",
    "EndpointBusy",
    "EndpointError",
    "EndpointFailure",
    "Events",
    "FallbackServed",
    "HealthChecked",
    "Limit",
    "LimitExceeded",
    "MemoryStore",
    "OnError",
    "Outcome",
    "PolicyError",
    "RedisStore",
    "RequestDeferred",
    "RequestFailed",
    "RequestWaited",
    "State",
    "StateChange",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "Ticket",
    "TimeWindow",
    "default_classify",
    "report_tokens",
    "retry_hint",
    "tokens_of",
]

try:
    __version__ = _metadata.version("cbtasks")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# Public names report the module users import them from (as httpx's do), so
# reprs, tracebacks and the API reference say `cbtasks.CircuitBreaker`.
# (Classifier, a type alias, has no module of its own to set.)
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or _inspect.isfunction(_obj):
        _obj.__module__ = __name__
del _name, _obj
