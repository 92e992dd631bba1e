"""The completion guard: a task id whose call succeeded is not called again when redelivered.

While Redis is down the guard can be neither read nor written: the task goes
on without it (a redelivery then may call the endpoint again), as failing
every task during a Redis outage would be worse.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from ..stores._connection import REDIS_TROUBLE, cause
from ..stores._keys import done_key

log = logging.getLogger("cbtasks.task")


class CompletionGuard:
    """Marks of completed task ids, with their results.

    With a result backend (``backend``), the mark is Celery's own: a task that
    succeeded has SUCCESS and its result there, so the guard writes nothing
    and reads the backend. Without one (or for a task that ignores its
    result), the guard keeps its own mark in Redis for ``ttl`` seconds.
    """

    def __init__(
        self,
        client: Any,
        prefix: str,
        on_error: Callable[[BaseException], None] | None = None,
        backend: Any = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        #: The task's result backend, when it stores the task's results.
        self.backend = backend
        #: Told of each read or mark Redis could not serve (the metrics count them:
        #: a mark not written is a redelivery that may call the endpoint again).
        self.on_error = on_error

    def _key(self, task_id: str) -> str:
        return done_key(self.prefix, task_id)

    def result_of(self, task_id: str) -> tuple[Any] | None:
        """``(result,)`` if ``task_id`` completed before, else None."""
        if self.backend is not None:
            try:
                meta = self.backend.get_task_meta(task_id)
            except Exception as exc:  # a backend that cannot answer: call, as in an outage
                self._failed(exc)
                return None
            return (meta.get("result"),) if meta.get("status") == "SUCCESS" else None
        try:
            raw = self.client.get(self._key(task_id))
        except REDIS_TROUBLE as exc:
            self._failed(exc)
            return None
        if raw is None:
            return None
        try:
            return (json.loads(raw),)
        except ValueError:  # not our JSON (UnicodeDecodeError is a ValueError too)
            # A mark that cannot be read is no mark: call the endpoint, as when
            # Redis is down, rather than fail the task over the guard's own key.
            log.warning(
                "the completion mark of task %s is not JSON (%r...): calling the endpoint",
                task_id,
                raw[:40],
            )
            return None

    def mark(self, task_id: str, result: Any, ttl: float) -> None:
        """Remember that ``task_id`` completed with ``result`` (the backend's store does it)."""
        if self.backend is not None:
            return
        try:
            encoded = json.dumps(result)
        except (TypeError, ValueError):
            encoded = "null"  # the mark is what matters; Celery reports the error itself
        try:
            self.client.set(self._key(task_id), encoded, px=int(ttl * 1000))
        except REDIS_TROUBLE as exc:
            self._failed(exc)
            log.warning("cannot mark task %s completed (%s)", task_id, cause(exc))

    def _failed(self, exc: BaseException) -> None:
        if self.on_error is not None:
            self.on_error(exc)
