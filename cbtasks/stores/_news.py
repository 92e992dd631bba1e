"""News: a daemon thread per process that hears what other processes publish.

Two channels: ``<prefix>:news`` carries each state change
(``name\\nversion\\nstate\\nremaining_ms\\nmode``), ``<prefix>:parked`` the
name of a breaker whose parking lot was empty and now holds a request. A
message is a hint, never the truth (anyone who can write to Redis can
publish): it makes a process ask the store again, or a releaser look again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import redis

from ._base import LocalView
from ._connection import REDIS_DOWN
from ._keys import news_channel, parked_channel

log = logging.getLogger("cbtasks.redis")

# After this long without a message the listener PINGs; without a PONG soon
# after, the subscription is dead (a frozen master, a failover) and is made again.
HEARTBEAT_SECONDS = 5.0
PONG_SECONDS = 2.0


class News(NamedTuple):
    """One published state change of a breaker."""

    name: str
    version: int
    state: int
    remaining_ms: int
    mode: int


def parse_news(data: bytes) -> News | None:
    """The state change in ``data``, or None if it is not one."""
    try:
        name, version, state, remaining, mode = data.decode().split("\n")
        return News(name, int(version), int(state), int(remaining), int(mode))
    except ValueError:  # UnicodeDecodeError is one too
        return None


class NewsListener:
    """Subscribes to ``handlers``' channels and passes each message's data to its handler.

    ``on_subscribed`` runs after each (re)subscription (news sent meanwhile is
    lost), ``on_outage`` with the error when Redis cannot be reached.
    """

    def __init__(
        self,
        client: redis.Redis,
        handlers: dict[str, Callable[[bytes], None]],
        *,
        on_subscribed: Callable[[], None],
        on_outage: Callable[[BaseException], None],
        retry_interval: float,
        name: str,
    ) -> None:
        self._client = client
        self._handlers = handlers
        self._on_subscribed = on_subscribed
        self._on_outage = on_outage
        self._retry_interval = retry_interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        #: Times it has subscribed: the first time, and after each loss.
        self.subscriptions = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)  # it wakes at least every 0.5 s

    def _run(self) -> None:
        while not self._stopped.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
            try:
                pubsub.subscribe(*self._handlers)
                self.subscriptions += 1
                self._on_subscribed()
                heard = pinged = time.monotonic()
                while not self._stopped.is_set():
                    try:
                        message = pubsub.get_message(timeout=0.5)
                    except redis.TimeoutError:
                        message = None
                    now = time.monotonic()
                    if message is not None:
                        heard = now
                        if message["type"] == "message":
                            self._dispatch(message)
                    elif now - heard > HEARTBEAT_SECONDS + PONG_SECONDS:
                        # A frozen or failed-over server keeps the socket open and
                        # says nothing: without this, news would stop for good.
                        raise redis.ConnectionError("breaker news went silent (no PONG)")
                    elif now - heard > HEARTBEAT_SECONDS and now - pinged > HEARTBEAT_SECONDS:
                        pubsub.ping()
                        pinged = now
            except REDIS_DOWN as exc:
                # Often the first sign of an outage: calls stop trusting cached views.
                if not self._stopped.is_set():
                    self._on_outage(exc)
                self._stopped.wait(self._retry_interval)
            except Exception:
                log.exception("breaker news listener failed; reconnecting")
                self._stopped.wait(self._retry_interval)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    log.debug("closing the news subscription failed", exc_info=True)

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        handler = self._handlers.get(channel.decode() if isinstance(channel, bytes) else channel)
        if handler is not None:
            handler(message["data"])


class ProcessNews:
    """This process's views of breakers, kept current by a :class:`NewsListener`.

    The listener starts with the first view asked for, and again in a forked
    child (Celery's prefork pool), where the parent's thread did not come along.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        on_outage: Callable[[BaseException], None],
        retry_interval: float,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.channel = news_channel(prefix)
        #: Where a parking lot that was empty announces its first request.
        self.parked_channel = parked_channel(prefix)
        self._on_outage = on_outage
        self._retry_interval = retry_interval
        self._views: dict[str, LocalView] = {}
        # Reentrant: starting the listener forgets the views, under the same lock.
        self._lock = threading.RLock()
        self._hooks: list[Callable[[str], None]] = []
        self._listener: NewsListener | None = None
        self._pid = os.getpid()
        self._malformed = 0
        self._next_malformed_log = 0.0

    def view(self, name: str) -> LocalView:
        """The shared view of breaker ``name`` in this process."""
        with self._lock:
            self._ensure_listener()
            view = self._views.get(name)
            if view is None:
                view = self._views[name] = LocalView()
            return view

    def existing_view(self, name: str) -> LocalView | None:
        """The view of breaker ``name`` if this process has one (made by a breaker)."""
        with self._lock:
            return self._views.get(name)

    def add_hook(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(name)`` on news of breaker ``name``: a state change or a first park.

        Hooks run on the news thread and must be quick (setting an event).
        """
        with self._lock:
            self._ensure_listener()
            self._hooks.append(hook)

    def remove_hook(self, hook: Callable[[str], None]) -> None:
        """Stop calling ``hook`` (a consumer restarting makes its hooks anew)."""
        with self._lock:
            if hook in self._hooks:
                self._hooks.remove(hook)

    def forget_views(self) -> None:
        """Every view asks the store next time: news may have been missed."""
        with self._lock:
            for view in self._views.values():
                view.forget()

    def forget(self, name: str) -> None:
        """The view of breaker ``name`` asks the store next time."""
        with self._lock:
            view = self._views.get(name)
        if view is not None:
            view.forget()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def _on_news(self, data: bytes) -> None:
        news = parse_news(data)
        if news is None:
            self._malformed += 1
            now = time.monotonic()
            if now >= self._next_malformed_log:  # garbage must not flood the log
                self._next_malformed_log = now + 60
                log.warning(
                    "ignoring malformed breaker news on %s (%d so far), latest: %r",
                    self.channel,
                    self._malformed,
                    data[:200],
                )
            return
        with self._lock:
            view = self._views.get(news.name)
        if view is not None:
            view.hint(news.version)
        self._tell_hooks(news.name)

    def _on_parked(self, data: bytes) -> None:
        self._tell_hooks(data.decode(errors="replace"))

    def _tell_hooks(self, name: str) -> None:
        for hook in list(self._hooks):
            try:
                hook(name)
            except Exception:
                log.exception("breaker news hook %r failed", hook)

    def _ensure_listener(self) -> None:
        """Start the listener if this process has none (the caller holds the lock)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._listener = None
            self._hooks.clear()  # the threads that set them stayed in the parent
            self.forget_views()
        if self._listener is None:
            self._listener = NewsListener(
                self.client,
                {self.channel: self._on_news, self.parked_channel: self._on_parked},
                on_subscribed=self.forget_views,
                on_outage=self._on_outage,
                retry_interval=self._retry_interval,
                name=f"cbtasks-news-{self.prefix}",
            )
            self._listener.start()
