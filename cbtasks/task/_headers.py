"""The headers a deferred request carries, and reading them from the request being run.

A deferred request is re-published with the same task id and its ``retries``
unchanged (Celery's ``retry()`` would add one), so the task's own retry
budget is untouched; what the deferral knows travels as these headers.
"""

from __future__ import annotations

import time
from typing import Any

#: Deferrals so far, and the epoch second past which the request is not deferred again.
DEFERRALS, DEADLINE = "cbtasks_deferrals", "cbtasks_deadline"
#: When the request was first deferred (epoch seconds): its wait, for the metrics.
DEFERRED_AT = "cbtasks_deferred_at"
#: The last reason it was deferred for (for `cbtasks waited`).
REASON = "cbtasks_reason"
#: How it was last deferred: "countdown" or "park" (what RequestWaited says).
DEFERRED_BY = "cbtasks_deferred_by"
#: Set by a sender that sends a task id again on purpose (``cbtasks batch`` when it
#: resumes): the completion guard looks, whatever the task's completion_check.
CHECK_COMPLETION = "cbtasks_check_completion"
#: Not a header: the worker that receives a message sets this field of its
#: request (its monotonic clock), and the completion guard reads how long it was held.
RECEIVED_AT = "cbtasks_received_at"
#: Every header cbtasks sets on a deferral: a parked message may carry these and no other.
ALL = frozenset({DEFERRALS, DEADLINE, DEFERRED_AT, REASON, DEFERRED_BY, CHECK_COMPLETION})


def waited_since(request: Any) -> float | None:
    """Seconds since a deferred request was first deferred; None if it never was."""
    deferred_at = header(request, DEFERRED_AT)
    if not isinstance(deferred_at, int | float) or isinstance(deferred_at, bool):
        return None
    return time.time() - deferred_at


def header(request: Any, name: str) -> Any:
    """A header of the request being run (Celery puts custom headers on the request)."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value
