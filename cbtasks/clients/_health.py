"""What a shipped client's ``health()`` found: ready, or why not."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HealthAnswer:
    """True when the endpoint said it is ready; otherwise ``error`` says why not.

    ``error`` is a :class:`TimeoutError` (no answer in time), a
    :class:`ConnectionError` (refused, unknown host, reset) or an
    :class:`~cbtasks.EndpointFailure` with the status (it answered: not ready).
    Given as a breaker's ``health_check`` (``health_check=client.health``),
    the checker hands ``error`` on as ``HealthChecked.error``, and the metric
    ``cbtasks_health_checks_total`` labels the result ``timeout``,
    ``unreachable`` or ``unhealthy`` from it.
    """

    ready: bool
    error: BaseException | None = None

    def __bool__(self) -> bool:
        return self.ready

    @property
    def why(self) -> str:
        """One line: "ready", or what went wrong."""
        return "ready" if self.ready else str(self.error or "not ready")
