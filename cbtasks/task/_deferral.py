"""Deferral: the headers a deferred request carries, its countdown, its parked form.

A deferred request is re-published with the same task id and its ``retries``
unchanged (Celery's ``retry()`` would add one), so the task's own retry
budget is untouched; its deferral count and deadline travel as headers.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import random
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import celery
from celery import _state as celery_state

#: The result backend's state of a deferred task (and Flower's, from its event).
CIRCUIT_OPEN = "CIRCUIT_OPEN"
log = logging.getLogger("cbtasks.task")

# Headers that travel with a deferred request.
DEFERRALS, DEADLINE = "cbtasks_deferrals", "cbtasks_deadline"
#: When the request was first deferred (epoch seconds): its wait, for the metrics.
DEFERRED_AT = "cbtasks_deferred_at"
# A countdown message waits in worker memory, unacknowledged: it must be
# re-published well before the broker's visibility timeout redelivers it.
_VISIBILITY_SHARE = 0.5


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


def countdown(app: celery.Celery, retry_after: float, jitter: float) -> float:
    """Until the next probe window, spread by jitter, capped below the visibility timeout."""
    options = app.conf.broker_transport_options or {}
    cap = float(options.get("visibility_timeout", 3600)) * _VISIBILITY_SHARE
    return min(max(retry_after, 0.05) + random.uniform(0, jitter), cap)


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
    """CIRCUIT_OPEN in the result backend: a waiting client sees why, not PENDING."""
    meta = {
        "breaker": exc.name,
        "reason": exc.reason,
        "retry_after": exc.retry_after,
        "deferrals": deferrals,
        "mode": mode,
    }
    try:
        task.update_state(state=CIRCUIT_OPEN, meta=meta)
    except Exception:  # a state for watching: never lose the deferral over it
        log.debug("could not report %s for %s", CIRCUIT_OPEN, task.request.id, exc_info=True)


def parked_message(
    task: celery.Task, args: tuple[Any, ...], kwargs: dict[str, Any], headers: dict[str, Any]
) -> dict[str, Any]:
    """What the parking lot keeps of a request: enough to publish it again as it was."""
    request = task.request
    options = {
        key: value
        for key, value in request.as_execution_options().items()
        if value is not None and key not in ("headers", "retries")
    }
    delivery = request.delivery_info or {}
    return {
        "task": task.name,
        "args": list(args),
        "kwargs": kwargs,
        "retries": request.retries,
        "headers": headers,
        "queue": delivery.get("routing_key") or None,
        "options": options,
    }


class PoisonMessage(ValueError):
    """A parked message that must not be published: it goes to the dead letters."""


# The only options a parked request is published again with: Celery's own
# identity, time limits and workflow links; never a serializer or an exchange.
_OPTIONS = (
    "task_id",
    "root_id",
    "parent_id",
    "group_id",
    "group_index",
    "shadow",
    "expires",
    "soft_time_limit",
    "time_limit",
    "link",
    "link_error",
    "chain",
    "chord",
)
_NEVER = frozenset({"serializer", "compression", "content_type", "content_encoding", "exchange"})


def publish_parked(
    app: celery.Celery, breaker: str, request_id: str, message: dict[str, Any]
) -> None:
    """Publish a parked request again, under its own task id.

    Only a task of ``breaker``'s own (a CircuitBreakerTask that parks there),
    with its arguments and a fixed set of options; anything else raises
    PoisonMessage, saying why.
    """
    name = message.get("task")
    task = app.tasks.get(name) if isinstance(name, str) else None
    if task is None or not hasattr(task, "cbtasks_parking"):
        raise PoisonMessage(f"{name!r} is not a CircuitBreakerTask of this app")
    if (getattr(task, "breaker", None) or task.name) != breaker:
        raise PoisonMessage(f"{name!r} does not park with breaker {breaker!r}")
    args, kwargs, retries = message.get("args"), message.get("kwargs"), message.get("retries")
    headers, queue = message.get("headers"), message.get("queue")
    options = message.get("options")
    if not (
        isinstance(args, list)
        and isinstance(kwargs, dict)
        and all(isinstance(key, str) for key in kwargs)
        and isinstance(retries, int)
        and retries >= 0
        and isinstance(headers, dict)
        and set(headers) <= {DEFERRALS, DEADLINE, DEFERRED_AT, "cbtasks_reason"}
        and (queue is None or isinstance(queue, str))
        and isinstance(options, dict)
    ):
        raise PoisonMessage("malformed: args, kwargs, retries, headers, queue or options")
    if options.get("task_id", request_id) != request_id:
        raise PoisonMessage(f"its task_id is not {request_id!r}")
    kept = {key: _without_transport(options[key]) for key in _OPTIONS if key in options}
    kept["task_id"] = request_id
    task.apply_async(args, kwargs, retries=retries, headers=headers, queue=queue, **kept)


def _without_transport(value: Any) -> Any:
    """A workflow link's options, minus any serializer, compression or exchange."""
    if isinstance(value, dict):
        return {k: _without_transport(v) for k, v in value.items() if k not in _NEVER}
    if isinstance(value, list):
        return [_without_transport(v) for v in value]
    return value


def expires_at(message: dict[str, Any]) -> float | None:
    """When a parked request expires (epoch seconds), from its ``expires`` option."""
    expires = message["options"].get("expires")
    if expires is None:
        return None
    if isinstance(expires, int | float):
        return float(expires)
    try:
        return datetime.fromisoformat(str(expires)).timestamp()
    except ValueError:
        return None  # Celery checks it again when the request is published


def revoke_expired(app: celery.Celery, request_id: str, message: dict[str, Any]) -> None:
    """A parked request expired: REVOKED in the result backend and to Flower, as Celery does."""
    app.backend.mark_as_revoked(request_id, "expired")
    with app.events.default_dispatcher() as dispatcher:
        dispatcher.send(
            "task-revoked", uuid=request_id, terminated=False, signum=None, expired=True
        )


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
