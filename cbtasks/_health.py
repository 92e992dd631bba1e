"""Health checks: while a circuit is open, one process of the fleet asks the endpoint.

A check that passes ends the open period early (half-open); it never closes
the circuit. Envoy's docs warn that a health check which does not exercise
the real request path un-ejects hosts too early: here only real calls (the
probes) decide whether the circuit closes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
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
    raised one, or the ``error`` of a falsy answer that has one (the shipped
    clients' ``health()``: a timeout, an unreachable endpoint, a status). A
    check that raises counts as unhealthy; so does one that has not answered
    within ``timeout`` seconds (its error a TimeoutError), and no other check
    starts while it hangs: a check without a deadline would block its checker
    for ever.
    """

    def __init__(
        self,
        name: str,
        store: Store,
        check: HealthCheck,
        interval: float,
        on_healthy: Callable[[], object],
        on_result: Callable[[str, bool, BaseException | None], None] | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self._pending: concurrent.futures.Future[object] | None = None
        self._pending_since = 0.0
        self._runner: concurrent.futures.ThreadPoolExecutor | None = None
        self._runner_pid = 0
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
        healthy, error = self._ask()
        self.checks += 1
        if self.on_result is not None:
            self.on_result(self.name, healthy, error)
        if healthy:
            self.passed += 1
            self.on_healthy()

    def _check_runner(self) -> concurrent.futures.ThreadPoolExecutor:
        """The thread the check runs on (so a hung check can be given up on): one per
        process, made again in a forked child, where the parent's did not come along."""
        if self._runner is None or self._runner_pid != os.getpid():
            self._runner_pid = os.getpid()
            self._pending = None
            self._runner = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"cbtasks-check-{self.name}"
            )
        return self._runner

    def _ask(self) -> tuple[bool, BaseException | None]:
        """Run the check, bounded by ``timeout``: (healthy, why not)."""
        runner = self._check_runner()  # first: a forked child forgets the parent's pending
        pending = self._pending
        if pending is not None and not pending.done():
            since = time.monotonic() - self._pending_since
            return False, TimeoutError(
                f"the health check has not returned for {since:.1f} s (timeout {self.timeout:g} s)"
            )
        self._pending = runner.submit(self.check)
        self._pending_since = time.monotonic()
        try:
            answer = self._pending.result(self.timeout)
            if answer:
                return True, None
            # A shipped client's HealthAnswer says why not; a plain False says nothing.
            why = getattr(answer, "error", None)
            error = why if isinstance(why, BaseException) else None
            if error is not None:
                log.debug("breaker %r: health check: not ready: %s", self.name, error)
            return False, error
        except concurrent.futures.TimeoutError:
            error = TimeoutError(f"the health check timed out after {self.timeout:g} s")
        except Exception as exc:
            error = exc
        log.debug("breaker %r: health check failed: %r", self.name, error)
        return False, error


def health_checker(
    name: str,
    store: Store,
    check: HealthCheck | None,
    interval: object,
    on_healthy: Callable[[], object],
    timeout: object = 5.0,
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
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise PolicyError(
            f"health_timeout must be seconds above 0 and at most 3600, got {timeout!r}"
        )
    checker = HealthChecker(name, store, check, float(interval), on_healthy, timeout=float(timeout))
    checker.ensure_running()
    return checker
