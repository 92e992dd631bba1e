"""The exceptions cbtasks raises.

CBTasksError
├── CircuitOpenError        a call was not made: the circuit is open
├── PolicyError (ValueError) a BreakerPolicy or breaker option is invalid
└── StoreError              the state store failed
    └── StoreUnavailableError   the store cannot be reached (Redis down, bad host)
"""

from __future__ import annotations


class CBTasksError(Exception):
    """Base class of every error cbtasks raises on purpose."""


class CircuitOpenError(CBTasksError):
    """The breaker rejected a call without making it.

    ``name`` is the breaker's name, ``retry_after`` the number of seconds
    after which a call may be admitted again (a probe, or the circuit closed).
    """

    def __init__(self, name: str, retry_after: float, reason: str = "circuit is open") -> None:
        self.name = name
        self.retry_after = retry_after
        self.reason = reason
        super().__init__(f"breaker {name!r}: {reason}; retry after {retry_after:.3f}s")

    def __reduce__(self) -> tuple[object, ...]:
        # Keeps the error intact when Celery sends it across processes as a result.
        return (type(self), (self.name, self.retry_after, self.reason))


class PolicyError(CBTasksError, ValueError):
    """An invalid policy value or breaker option; the message names the fix."""


class StoreError(CBTasksError):
    """The breaker's state store failed."""


class StoreUnavailableError(StoreError):
    """The breaker's state store cannot be reached."""
