"""Countdown deferral: when the request comes back, and re-publishing it as the same request."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import celery
from celery import _state as celery_state

from .._errors import CallRefused, LimitExceeded
from ._visibility import safe_hold


def deferral_countdown(app: celery.Celery, refused: CallRefused, jitter: float) -> float:
    """The countdown of a request the circuit or the limit refused: when it may get
    through (``retry_after``: the open period's end; while half-open, about one
    probe's duration; for a limit, when a slot or permit is due), spread by jitter.

    The refusal says which (``CircuitOpenError.state``, ``LimitExceeded.kind``): a
    countdown of its own for one of them is decided here.
    """
    if isinstance(refused, LimitExceeded):
        # The limit says when a slot or permit is due: spread the fleet's return
        # over as long again, not over a circuit's second.
        jitter = min(jitter, max(refused.retry_after, 0.05))
    return countdown(app, refused.retry_after, jitter)


def countdown(app: celery.Celery, retry_after: float, jitter: float) -> float:
    """Until the next probe window, spread by jitter, capped below the visibility timeout."""
    # The countdown message waits in worker memory, unacknowledged: it must be
    # re-published before the broker's visibility timeout delivers it again.
    return min(max(retry_after, 0.05) + random.uniform(0, jitter), safe_hold(app))


@contextlib.contextmanager
def as_the_same_request() -> Iterator[None]:
    """Send from outside the running task, for a deferral's re-publish.

    Celery makes the running task the parent (and root) of whatever it sends
    when the message names none; a deferral is the same request again, with
    the parent and root it came with (none, for a top-level task), not a
    child of itself.
    """
    stack = celery_state._task_stack
    hidden = []
    while stack.top is not None:
        hidden.append(stack.pop())
    try:
        yield
    finally:
        while hidden:
            stack.push(hidden.pop())
