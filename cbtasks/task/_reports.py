"""What watchers see of a refused request: Flower's task events, the result backend's state.

:func:`flower_events` is a subscriber of a breaker's events: each request
deferred, parked, answered by a fallback or failed becomes a custom task
event (``task-circuit_open``, ``task-limit`` for one the limit refused,
``task-circuit_fallback``), which Flower shows as the task's state
(CIRCUIT_OPEN, LIMIT, CIRCUIT_FALLBACK), with a one-line ``result`` saying why.
"""

from __future__ import annotations

import logging
from typing import Any

import celery

from .._errors import LimitExceeded
from .._events import Event, FallbackServed, RequestDeferred, RequestFailed
from ._modes import MODES

#: The result backend's state of a deferred task (and Flower's, from its event).
CIRCUIT_OPEN = "CIRCUIT_OPEN"
#: ... of a task whose request the limit refused (the circuit is closed).
LIMIT = "LIMIT"


def _refusal_event(exc: Any) -> str:
    """The task event of a refusal: Flower shows LIMIT apart from CIRCUIT_OPEN."""
    return "task-limit" if isinstance(exc, LimitExceeded) else "task-circuit_open"


log = logging.getLogger("cbtasks.task")


def flower_events(event: Event) -> None:
    """A subscriber: the task events Flower shows for what a task did with a refused request."""
    match event:
        case RequestDeferred():
            mode = MODES.get(event.mode)
            fields: dict[str, Any] = {"action": mode.action if mode else "deferred"}
            if event.countdown is not None:
                fields["countdown"] = event.countdown
            fields["deferrals"] = event.deferrals
            send_circuit_event(event.task, _refusal_event(event.error), event.error, **fields)
        case FallbackServed():
            send_circuit_event(event.task, "task-circuit_fallback", event.error, kind=event.kind)
        case RequestFailed():
            send_circuit_event(
                event.task, _refusal_event(event.error), event.error, action="failed"
            )


def send_circuit_event(task: celery.Task, type_: str, exc: Any, **fields: Any) -> None:
    """A custom task event: Flower shows the task as CIRCUIT_OPEN / CIRCUIT_FALLBACK, and why."""
    try:
        action = fields.setdefault("action", "fallback")
        task.send_event(
            type_,
            breaker=exc.name,
            reason=exc.reason,
            retry_after=exc.retry_after,
            result=event_summary(exc, action, fields),
            **fields,
        )
    except Exception:  # events are for watching: never fail the task over one
        log.debug("could not send %s for %s", type_, task.request.id, exc_info=True)


def event_summary(exc: Any, action: str, fields: dict[str, Any]) -> str:
    """One line for a task event's ``result``: what Flower's task page and list show.

    Flower shows Celery's standard fields only; the reason, the breaker and
    how the request waits go where it shows them.
    """
    why = f"{exc.reason} (breaker {exc.name})"
    deferral = f", deferral {fields['deferrals']}" if "deferrals" in fields else ""
    if action == "deferred":
        return f"{why}: deferred {fields['countdown']:.1f} s by countdown{deferral}"
    if action == "parked":
        return f"{why}: parked until the circuit closes{deferral}"
    if action == "fallback":
        return f"{why}: answered by the {fields['kind']} fallback"
    return f"{why}: not run"


def report_deferred(task: celery.Task, exc: Any, mode: str, deferrals: int) -> None:
    """CIRCUIT_OPEN (or LIMIT) in the result backend: a waiting client sees why, not PENDING."""
    meta = {
        "breaker": exc.name,
        "reason": exc.reason,
        "retry_after": exc.retry_after,
        "deferrals": deferrals,
        "mode": mode,
        "refused_by": getattr(exc, "kind", "circuit"),
    }
    state = LIMIT if isinstance(exc, LimitExceeded) else CIRCUIT_OPEN
    try:
        task.update_state(state=state, meta=meta)
    except Exception:  # a state for watching: never lose the deferral over it
        log.debug("could not report %s for %s", state, task.request.id, exc_info=True)
