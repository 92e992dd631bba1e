"""Worker memory through an outage: a full garbage collection now and then."""

from __future__ import annotations

import gc
import itertools

_deferrals = itertools.count(1)


def collect_now_and_then(every: int) -> None:
    """A full garbage collection every ``every`` deferrals in this process.

    A deferral ends the task with Ignore, and Celery's trace keeps each
    ignored task's exception info in a reference cycle with its own frame
    (the traceback points at the frame that holds it), about 200 KB a task.
    Only a full collection frees those, and a busy worker rarely runs one:
    measured here, 750 deferrals per process grew each by 157 MB; collecting
    every 25 deferrals holds the growth at 15 MB for 2,500 per process.
    """
    if every and next(_deferrals) % every == 0:
        gc.collect()
