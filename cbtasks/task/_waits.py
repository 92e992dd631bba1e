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

from ..ops.metrics import metrics
from ..stores._connection import REDIS_TROUBLE
from ..stores._keys import breaker_keys
from ._deferral import DEFERRALS, header
from ._options import option

log = logging.getLogger("cbtasks.task")

KEEP = 1000
KEEP_SECONDS = 7 * 24 * 3600
#: The last reason a request was deferred for (a header, as the deferral count is).
REASON = "cbtasks_reason"


def note_wait(task: Any, breaker: str, seconds: float) -> None:
    """A deferred request runs at last: counted in the metrics, and kept for `cbtasks waited`."""
    mode = str(option(task, "defer"))
    metrics().waited(breaker, mode, seconds)
    entry = {
        "task_id": task.request.id,
        "task": task.name,
        "deferrals": int(header(task.request, DEFERRALS) or 0),
        "waited_seconds": round(seconds, 3),
        "mode": mode,
        "reason": str(header(task.request, REASON) or ""),
        "ran_at": time.time(),
    }
    record_wait(task.cbtasks_redis, task.cbtasks_prefix, breaker, entry)


def record_wait(client: Any, prefix: str, breaker: str, entry: dict[str, Any]) -> None:
    """Keep ``entry`` (a request that ran after waiting); never fails the task over it."""
    key = breaker_keys(prefix, breaker).waited
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {json.dumps(entry, sort_keys=True): time.time()})
            pipe.zremrangebyrank(key, 0, -KEEP - 1)
            pipe.expire(key, KEEP_SECONDS)
            pipe.execute()
    except REDIS_TROUBLE as exc:
        log.warning("cannot record the wait of task %s (%s)", entry.get("task_id"), exc)


def recent_waits(client: Any, prefix: str, breaker: str, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` entries, newest first."""
    raw = client.zrevrange(breaker_keys(prefix, breaker).waited, 0, limit - 1)
    entries = []
    for item in raw:
        try:
            entries.append(dict(json.loads(item)))
        except (ValueError, TypeError):  # not ours: skip, as news does
            continue
    return entries
