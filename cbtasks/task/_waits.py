"""Which requests waited for their circuit, how long and why: kept after they ran.

When a deferred request finally runs, one entry goes to a per-breaker list
in Redis (``<prefix>:{breaker}:waited``, the newest 1,000, kept a week):
the task id and name, its deferrals, the seconds since its first deferral,
how it waited and the last reason. ``cbtasks waited NAME`` lists them, so an
operator can find afterwards what an outage held up, after Flower shows only
SUCCESS.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .._events import Event, RequestWaited
from ..stores._connection import REDIS_TROUBLE, cause
from ..stores._keys import breaker_keys
from ._headers import DEFERRALS, REASON, header

log = logging.getLogger("cbtasks.task")

KEEP = 1000
KEEP_SECONDS = 7 * 24 * 3600


def waits_record(event: Event) -> None:
    """A subscriber: a deferred request ran at last; kept for `cbtasks waited`."""
    if not isinstance(event, RequestWaited):
        return
    task = event.task
    entry = {
        "task_id": task.request.id,
        "task": task.name,
        "deferrals": int(header(task.request, DEFERRALS) or 0),
        "waited_seconds": round(event.seconds, 3),
        "mode": event.mode,
        "reason": str(header(task.request, REASON) or ""),
        "ran_at": time.time(),
    }
    record_wait(task.cbtasks_redis, task.cbtasks_prefix, event.breaker, entry)


def record_wait(client: Any, prefix: str, breaker: str, entry: dict[str, Any]) -> None:
    """Keep ``entry`` (a request that ran after waiting); never fails the task over it."""
    if not hasattr(client, "pipeline"):
        return  # memory:// keeps no record: it is for `cbtasks waited` across a fleet
    key = breaker_keys(prefix, breaker).waited
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {json.dumps(entry, sort_keys=True): time.time()})
            pipe.zremrangebyrank(key, 0, -KEEP - 1)
            pipe.expire(key, KEEP_SECONDS)
            pipe.execute()
    except REDIS_TROUBLE as exc:
        log.warning("cannot record the wait of task %s (%s)", entry.get("task_id"), cause(exc))
