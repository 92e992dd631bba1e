"""The per-process parts of a CircuitBreakerTask: its breaker, store, parking lot, guard, releaser.

Each is made once per process (Celery's prefork pool forks after the app is
loaded, so nothing made in the parent is used in a child) and kept here.
"""

from __future__ import annotations

import functools
import os
from typing import Any, ClassVar

from .._breaker import CircuitBreaker
from .._policy import BreakerPolicy
from ..ops.metrics import metrics
from ..stores import RedisStore
from ..stores._connection import describe_client
from ..stores._parking import ParkingLot
from ._completion import CompletionGuard
from ._options import classify_of, health_check_of, option, policy_of, redis_url
from ._parked import publish_parked, revoke_expired
from ._releaser import Releaser
from ._reports import flower_events
from ._waits import waits_record


class ProcessParts:
    """Mixed into CircuitBreakerTask: what each process makes once per task."""

    name: str
    app: Any
    breaker: str | None

    _per_process: ClassVar[dict[tuple[int, str], Any]] = {}

    @property
    def cbtasks_breaker(self) -> CircuitBreaker:
        """This process's breaker object for the task's circuit."""
        return self._cached("breaker", self._make_breaker)  # type: ignore[no-any-return]

    @property
    def cbtasks_store(self) -> RedisStore:
        url = redis_url(self.app)
        prefix = self.cbtasks_prefix
        on_error = self._option("on_error")
        timeout = float(self._option("redis_timeout"))
        key = f"store:{url}:{prefix}:{on_error}:{timeout}"
        return self._cached(key, lambda: _store(url, prefix, on_error, timeout))  # type: ignore[no-any-return]

    @property
    def cbtasks_redis(self) -> Any:
        return self.cbtasks_store.client

    @property
    def cbtasks_prefix(self) -> str:
        return str(self._option("prefix"))

    @property
    def cbtasks_parking(self) -> ParkingLot:
        return self._cached(  # type: ignore[no-any-return]
            "parking",
            lambda: ParkingLot(self.cbtasks_redis, self.cbtasks_prefix, self.cbtasks_breaker.name),
        )

    @property
    def cbtasks_completions(self) -> CompletionGuard:
        return self._cached(  # type: ignore[no-any-return]
            "completions",
            lambda: CompletionGuard(
                self.cbtasks_redis, self.cbtasks_prefix, on_error=metrics().store_error
            ),
        )

    def _make_breaker(self) -> CircuitBreaker:
        breaker = CircuitBreaker(
            self.breaker or self.name,
            policy=self._policy(),
            store=self.cbtasks_store,
            health_check=health_check_of(self),
            health_interval=float(self._option("health_interval")),
            classify=classify_of(self),
        )
        # What the breaker and the task do reaches the metrics, Flower and the
        # waits record through the breaker's one stream of events.
        for subscriber in (metrics().observe, flower_events, waits_record):
            breaker.events.subscribe(subscriber)
        return breaker

    def _policy(self) -> BreakerPolicy:
        return policy_of(self)

    def _cached(self, what: str, make: Any) -> Any:
        key = (os.getpid(), f"{self.name}:{what}")
        value = self._per_process.get(key)
        if value is None:
            value = self._per_process[key] = make()
        return value

    def cbtasks_releaser(self) -> Releaser:
        """This process's releaser of the breaker's parked requests, started if need be."""
        store = self.cbtasks_store
        key = f"{describe_client(store.client)}|{store.prefix}|{self.cbtasks_breaker.name}"

        def make() -> Releaser:
            return Releaser(
                self.cbtasks_parking,
                functools.partial(publish_parked, self.app, self.cbtasks_breaker.name),
                expire=functools.partial(revoke_expired, self.app),
                rate=float(self._option("release_rate")),
                max_rate=float(self._option("max_release_rate")),
            )

        return Releaser.ensure(key, make, store.add_news_hook)

    def _option(self, name: str) -> Any:
        return option(self, name)


def _store(url: str, prefix: str, on_error: str, timeout: float) -> RedisStore:
    store = RedisStore(url, prefix=prefix, on_error=on_error, timeout=timeout)
    store.on_store_error = metrics().store_error
    return store
