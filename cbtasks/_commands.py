"""The operator's commands on a breaker: they change the shared state for every process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._policy import PolicyWire
    from .stores._base import Reply


class OperatorCommands:
    """Mixed into CircuitBreaker: force open or closed, reset, shadow mode, a passed health check.

    Each is one atomic step of the store's machine; every process learns of
    it from the news (or from its next call's reply).
    """

    if TYPE_CHECKING:  # what CircuitBreaker provides
        name: str
        store: Any
        _wire: PolicyWire

        def _require_sync(self, what: str) -> None: ...
        def _learn(self, reply: Reply) -> None: ...

    def force_open(self) -> None:
        """Open the circuit until :meth:`force_close` or :meth:`reset`, everywhere."""
        self._control("force_open")

    def force_close(self) -> None:
        """Close the circuit now, everywhere; it may trip again."""
        self._control("force_close")

    def reset(self) -> None:
        """Forget all state: closed, no counts, no backoff, not disabled."""
        self._control("reset")

    def disable(self) -> None:
        """Shadow mode: admit every call but keep counting, everywhere."""
        self._control("disable")

    def enable(self) -> None:
        """Leave shadow mode (or a forced open): the policy decides again."""
        self._control("enable")

    def health_passed(self) -> None:
        """A health check passed: an open circuit goes half-open now (probes decide the rest)."""
        self._control("healthy")

    def _control(self, op: str) -> None:
        self._require_sync("control")
        self._learn(self.store.control(self.name, self._wire, op))
