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
        # BaseException.__new__ has stored the arguments in self.args already,
        # and the message is built only when shown: a rejection stays cheap.
        self.name = name
        self.retry_after = retry_after
        self.reason = reason

    def __str__(self) -> str:
        return f"breaker {self.name!r}: {self.reason}; retry after {self.retry_after:.3f}s"


class PolicyError(CBTasksError, ValueError):
    """An invalid policy value or breaker option; the message names the fix."""


class StoreError(CBTasksError):
    """The breaker's state store failed."""


class StoreUnavailableError(StoreError):
    """The breaker's state store cannot be reached."""
