"""Health checks: while a circuit is open, one process of the fleet asks the endpoint.

A check that passes ends the open period early (half-open); it never closes
the circuit. Envoy's docs warn that a health check which does not exercise
the real request path un-ejects hosts too early: here only real calls (the
probes) decide whether the circuit closes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from ._errors import PolicyError
from ._machine import OPEN
from ._state import Mode
from .stores._base import Store

log = logging.getLogger("cbtasks")

HealthCheck = Callable[[], object]


class HealthChecker:
    """A daemon thread per breaker and process; calls ``check()`` while the circuit is open.

    Every ``interval`` seconds each process that a store reply told "open"
    asks the store for the fleet's turn (a lease of ``interval``): exactly one calls
    ``check()``. A truthy answer sends the ``healthy`` command. ``on_result``
    (the breaker's events) hears each answer, with the exception if the check
    raised one. A check that raises counts as unhealthy.
    """

    def __init__(
        self,
        name: str,
        store: Store,
        check: HealthCheck,
        interval: float,
        on_healthy: Callable[[], object],
        on_result: Callable[[str, bool, BaseException | None], None] | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.check = check
        self.on_healthy = on_healthy
        self.interval = interval
        self.on_result = on_result
        #: Checks this process made, and how many passed.
        self.checks = 0
        self.passed = 0
        #: Until when, on the store's local clock, a reply said the circuit is open.
        self.open_until = 0.0
        self.forced_open = False
        self._pid = 0
        self._stopped = threading.Event()

    def observe(self, state: int, remaining_ms: int, mode: int, now: float) -> None:
        """What a store reply said: open (until when), forced open, or neither.

        Only replies count, never news (a hint anyone could forge) nor a
        forgotten view: a process that has not heard from the store itself
        leaves the checking to those that have.
        """
        self.forced_open = mode == Mode.FORCED_OPEN
        self.open_until = now + remaining_ms / 1000 if state == OPEN else 0.0

    def ensure_running(self) -> None:
        """Start the thread, again in a forked child (Celery's prefork pool)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._stopped = threading.Event()
            name = f"cbtasks-health-{self.name}"
            threading.Thread(target=self._run, name=name, daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        stopped = self._stopped
        while not stopped.wait(self.interval):
            try:
                self._once()
            except Exception:
                log.exception("breaker %r: health check round failed", self.name)

    def _once(self) -> None:
        if self.forced_open or self.store.local_clock() >= self.open_until:
            return
        if not self.store.claim(self.name, "health", int(self.interval * 1000)):
            return  # another process has this round
        error: BaseException | None = None
        try:
            healthy = bool(self.check())
        except Exception as exc:
            log.debug("breaker %r: health check raised %r", self.name, exc)
            healthy, error = False, exc
        self.checks += 1
        if self.on_result is not None:
            self.on_result(self.name, healthy, error)
        if healthy:
            self.passed += 1
            self.on_healthy()


def health_checker(
    name: str,
    store: Store,
    check: HealthCheck | None,
    interval: object,
    on_healthy: Callable[[], object],
) -> HealthChecker | None:
    """A running checker for ``check``, or None without one; PolicyError on bad values."""
    if check is None:
        return None
    if not callable(check):
        raise PolicyError(f"health_check must be callable, got {check!r}")
    if not isinstance(interval, int | float) or not 0 < interval <= 3600:
        raise PolicyError(
            f"health_interval must be seconds above 0 and at most 3600, got {interval!r}"
        )
    checker = HealthChecker(name, store, check, float(interval), on_healthy)
    checker.ensure_running()
    return checker
