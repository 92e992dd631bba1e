"""The releaser: a thread in each worker's main process that re-publishes parked requests.

Parked requests whose ``expires`` passes are handed to ``expire`` (the
task revokes them, as Celery's own expiry would) whatever the circuit's
state. It sleeps while nothing can be released: with nothing parked or the circuit
forced open it waits for news (a state change, or the first request parked);
while the circuit is open it waits until the probe window. One read-only
re-check every ``RECHECK_SECONDS`` covers a news message that was lost. Once
the circuit closes, ``release.lua`` paces the backlog with a slow start.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from ..stores._connection import REDIS_DOWN, cause
from ..stores._parking import ParkingLot
from ._parked import PoisonMessage

log = logging.getLogger("cbtasks.task")

#: At most this long between two looks at a lot, news or not: an idle worker
#: sends about 0.2 commands a second per releaser for it (and the news
#: listener one PING per HEARTBEAT_SECONDS of silence, 5 s).
RECHECK_SECONDS = 6.0
#: How long a handed-out request may take to be re-published before another
#: releaser takes it over.
LEASE_SECONDS = 30.0
#: Publish to the broker in batches of at most this many.
BATCH = 100


class Releaser:
    """Releases one breaker's parked requests, publishing each with ``publish``."""

    _running: ClassVar[dict[tuple[int, str], Releaser]] = {}
    _lock = threading.Lock()

    def __init__(
        self,
        lot: ParkingLot,
        publish: Callable[..., None],
        *,
        expire: Callable[[str, dict[str, Any]], None] | None = None,
        producer: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        rate: float,
        max_rate: float = math.inf,
        probe_interval: float = 1.0,
    ) -> None:
        self.lot = lot
        #: ``publish(request_id, message, producer=...)`` re-publishes one request.
        self.publish = publish
        #: A producer for a whole batch (the app's pool), so no message waits for one.
        self.producer = producer
        self.expire = expire
        self.rate = rate
        self.max_rate = max_rate
        self.probe_interval = probe_interval
        self.wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def ensure(cls, key: str, make: Callable[[], Releaser], subscribe: Any) -> Releaser:
        """The running releaser for ``key`` in this process, started if there is none.

        ``subscribe(hook)`` registers ``hook(name)`` to be called on news.
        """
        with cls._lock:
            full_key = (os.getpid(), key)
            releaser = cls._running.get(full_key)
            if releaser is None:
                releaser = cls._running[full_key] = make()
                subscribe(releaser.hear)
                releaser._thread = threading.Thread(
                    target=releaser.run, name=f"cbtasks-release-{key}", daemon=True
                )
                releaser._thread.start()
            return releaser

    @classmethod
    def stop_all(cls, timeout: float = 5.0) -> None:
        """Stop this process's releasers (a worker shutting down): what a releaser has
        handed out but not published stays parked and comes back when its lease ends."""
        with cls._lock:
            mine = [key for key in cls._running if key[0] == os.getpid()]
            releasers = [cls._running.pop(key) for key in mine]
        for releaser in releasers:  # every one told first: the waits below may not happen
            releaser.stop(0)
        if not _may_wait():
            return
        for releaser in releasers:
            releaser.stop(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish no more; wait up to ``timeout`` for the batch in hand to finish."""
        self._stopped.set()
        self.wake.set()
        if (
            timeout > 0
            and self._thread is not None
            and self._thread is not threading.current_thread()
        ):
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def hear(self, name: str) -> None:
        """News of breaker ``name``: look again now if it is ours."""
        if name == self.lot.breaker:
            self.wake.set()

    def step(self) -> float | None:
        """Release what may go now; returns the seconds to wait (None: until news)."""
        batch = self.lot.release(
            self.rate,
            self.max_rate,
            lease_seconds=LEASE_SECONDS,
            probe_interval=self.probe_interval,
            most=BATCH,
        )
        for request_id, message in batch.expired:
            if self.expire is not None:
                self.expire(request_id, message)
        done: list[str] = []
        try:
            # One producer for the batch: no message waits to acquire one.
            with self.producer() as producer:
                for request_id, message in batch.requests:
                    if self._stopped.is_set():
                        break  # the rest of the batch comes back when its lease ends
                    try:
                        self.publish(request_id, message, producer=producer)
                    except PoisonMessage as exc:
                        # Never retried, never blocking the rest: put aside for an operator.
                        log.error("parked request %s of %s: %s", request_id, self.lot.breaker, exc)
                        self.lot.dead_letter(request_id, message, str(exc))
                        continue
                    done.append(request_id)
        finally:
            self.lot.ack(done)  # what failed to publish comes back when its lease ends
        return 0.0 if done or batch.expired else batch.wait

    def run(self) -> None:
        while not self._stopped.is_set():
            # Cleared before looking: news that comes while we look wakes the next wait.
            self.wake.clear()
            try:
                wait = self.step()
            except REDIS_DOWN as exc:
                log.warning(
                    "cannot release parked requests of %s (%s)", self.lot.breaker, cause(exc)
                )
                wait = 5.0
            except Exception:
                log.exception("releasing parked requests of %s failed", self.lot.breaker)
                wait = 1.0
            if wait == 0:
                continue
            self.wake.wait(RECHECK_SECONDS if wait is None else min(wait, RECHECK_SECONDS))


def _may_wait() -> bool:
    """False in gevent's or eventlet's event loop itself, where a worker's shutdown signal
    arrives under ``-P gevent`` / ``-P eventlet`` and any wait raises (gevent's
    BlockingSwitchOutError, eventlet's "Cannot switch to MAINLOOP from MAINLOOP"): there
    the releasers are told to stop and finish their batch in hand on their own."""
    try:
        gevent = sys.modules.get("gevent")
        if gevent is not None and gevent.getcurrent() is gevent.get_hub():
            return False
        eventlet = sys.modules.get("eventlet.hubs")
        if eventlet is not None:
            current = sys.modules["greenlet"].getcurrent()  # eventlet runs on greenlet
            return bool(eventlet.get_hub().greenlet is not current)
    except Exception:  # imported, but no hub running here
        return True
    return True
