"""An AsyncRedisStore driven from blocking code, so the store contract suite runs on it."""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

import redis

from cbtasks import AsyncRedisStore


class BlockingAsyncStore:
    """Runs each of an AsyncRedisStore's coroutines on a loop of its own, and waits.

    What the suite exercises is the async store's own code (its scripts,
    arguments, replies and outage handling); the breaker sees a blocking store.
    """

    def __init__(self, store: AsyncRedisStore) -> None:
        self.store = store
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._closed = False

    def __repr__(self) -> str:
        return f"BlockingAsyncStore({self.store!r})"

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self.store, attr)
        if inspect.iscoroutinefunction(value):
            return lambda *args, **kwargs: self.run(value(*args, **kwargs))
        return value

    def run(self, coroutine: Any) -> Any:
        if self._closed:  # a breaker's health thread may outlive its test
            coroutine.close()
            raise redis.ConnectionError("the store is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def close(self) -> None:
        self.run(self.store.aclose())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
