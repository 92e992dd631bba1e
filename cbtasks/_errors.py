"""The exceptions cbtasks raises.

CBTasksError
├── CallRefused             a call was not made: the breaker refused it
│   ├── CircuitOpenError        the circuit is open (or half-open, its probes taken)
│   └── LimitExceeded           the endpoint's limit is reached (concurrency, rate, tokens)
├── PolicyError (ValueError) a BreakerPolicy, Limit or breaker option is invalid
├── StoreError              the state store failed
│   └── StoreUnavailableError   the store cannot be reached (Redis down, bad host)
└── EndpointError           a call to a model endpoint went wrong (cbtasks' clients)
    ├── EndpointFailure         the endpoint's fault: down, timed out, 5xx
    │   └── EndpointBusy            healthy but saturated: 429, a full queue
    └── CallerError             the request's fault: 4xx, a bad payload
"""

from __future__ import annotations


class CBTasksError(Exception):
    """Base class of every error cbtasks raises on purpose."""


class CallRefused(CBTasksError):
    """The breaker refused a call without making it: the endpoint never saw it.

    ``name`` is the breaker's name, ``retry_after`` the number of seconds
    after which a call may be admitted again, ``reason`` why, for people.
    """

    # Called as CallRefused(name, retry_after[, reason[, detail]]). There is no
    # Python-level __init__ on purpose: BaseException keeps the arguments in
    # self.args in C, which keeps a rejection cheap; the fields read them.

    @property
    def name(self) -> str:
        """The breaker's name."""
        return str(self.args[0])

    @property
    def retry_after(self) -> float:
        """Seconds after which a call may be admitted again."""
        return float(self.args[1])

    @property
    def reason(self) -> str:
        """Why the call was rejected, for people."""
        return str(self.args[2]) if len(self.args) > 2 else "circuit is open"

    def __str__(self) -> str:
        return f"breaker {self.name!r}: {self.reason}; retry after {self.retry_after:.3f}s"

    def saying(self, reason: str) -> CallRefused:
        """The same refusal (its kind, breaker and wait), with another reason."""
        return type(self)(self.name, self.retry_after, reason, *self.args[3:])


class CircuitOpenError(CallRefused):
    """The circuit refused the call: it is open (or half-open with every probe slot taken).

    ``state`` is ``"open"`` or ``"half_open"``: a half-open circuit is worth
    coming back to soon, an open one after ``retry_after``.
    """

    @property
    def state(self) -> str:
        """The circuit's state when it refused: "open" or "half_open"."""
        return str(self.args[3]) if len(self.args) > 3 else "open"


class LimitExceeded(CallRefused):
    """The endpoint's limit refused the call: ``kind`` is "concurrency", "rate" or "tokens".

    ``retry_after`` comes from the limit's own state: when a slot is likely
    free (the oldest call's expected end) or the next permit is due.
    """

    @property
    def kind(self) -> str:
        """Which part of the limit refused: "concurrency", "rate" or "tokens"."""
        return str(self.args[3]) if len(self.args) > 3 else "concurrency"

    @property
    def reason(self) -> str:
        return str(self.args[2]) if len(self.args) > 2 else f"{self.kind} limit reached"


class PolicyError(CBTasksError, ValueError):
    """An invalid policy value or breaker option; the message names the fix."""


class StoreError(CBTasksError):
    """The breaker's state store failed."""


class StoreUnavailableError(StoreError):
    """The breaker's state store cannot be reached."""


class EndpointError(CBTasksError):
    """A call to a model endpoint went wrong; ``status`` is the HTTP or gRPC code if any."""

    def __init__(self, message: str, *, status: int | str | None = None) -> None:
        super().__init__(message)
        self.status = status


class EndpointFailure(EndpointError):
    """The endpoint failed (down, timed out, 5xx, 429, malformed answer).

    ``retry_after`` is the endpoint's own Retry-After, in seconds, if it sent
    one: the breaker then stays open at least that long.
    """

    def __init__(
        self, message: str, *, status: int | str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class EndpointBusy(EndpointFailure):
    """The endpoint is healthy but saturated: it answered "busy" (429, a full queue's 503).

    Classified as :attr:`~cbtasks.Outcome.OVERLOAD`: it shrinks an adaptive
    limit rather than counting toward opening the circuit.
    """


class CallerError(EndpointError):
    """The request was wrong (4xx, invalid payload): the task fails, the breaker is untouched."""
