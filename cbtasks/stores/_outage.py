"""What breakers do while their Redis cannot be reached: the ``on_error`` choice, and its log."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

log = logging.getLogger("cbtasks.redis")


class OnError(enum.StrEnum):
    """What breakers do while Redis cannot be reached."""

    #: Each process keeps its own in-memory breaker until Redis returns.
    LOCAL = "local"
    #: Admit every call (fail open).
    ADMIT = "admit"
    #: Reject every call with CircuitOpenError (fail closed).
    REJECT = "reject"


_MEANING = {
    OnError.LOCAL: "keep a local breaker in each process",
    OnError.ADMIT: "admit every call",
    OnError.REJECT: "reject every call",
}


class Outage:
    """Whether Redis is thought unreachable, since when, and when to try it again.

    Logs once when an outage starts and once when it ends; counts errors.
    """

    def __init__(self, on_error: OnError, retry_interval: float) -> None:
        self.on_error = on_error
        self.retry_interval = retry_interval
        self.started: float | None = None
        self.retry_at = 0.0
        #: Redis calls that failed.
        self.error_count = 0

    def skip_redis(self) -> bool:
        """True while in an outage and not yet time to try Redis again."""
        return self.started is not None and time.monotonic() < self.retry_at

    def failed(self, unreachable: str, on_start: Callable[[], None]) -> None:
        """A Redis call failed (``unreachable`` says how); ``on_start`` runs if this starts one."""
        self.error_count += 1
        self.retry_at = time.monotonic() + self.retry_interval
        if self.started is None:
            self.started = time.monotonic()
            on_start()
            log.warning(
                "%s; breakers now %s until it returns (on_error=%r)",
                unreachable,
                _MEANING[self.on_error],
                self.on_error.value,
            )

    def ended(self, where: str) -> None:
        """A Redis call succeeded during an outage."""
        assert self.started is not None
        seconds = time.monotonic() - self.started
        self.started = None
        log.warning(
            "Redis at %s is reachable again after %.1fs; breakers use the shared state",
            where,
            seconds,
        )
