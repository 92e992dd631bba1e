"""The parked form of a request: what the lot keeps, and how it goes back to the queue.

A parked request is published again only as a task of its own breaker, with
its own task id and a fixed set of options; anything else is poison, put
aside for an operator. A request whose ``expires`` passes while parked is
revoked, as Celery's own expiry reports it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import celery

from . import _headers


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
    app: celery.Celery,
    breaker: str,
    request_id: str,
    message: dict[str, Any],
    producer: Any = None,
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
        and set(headers) <= _headers.ALL
        and (queue is None or isinstance(queue, str))
        and isinstance(options, dict)
    ):
        raise PoisonMessage("malformed: args, kwargs, retries, headers, queue or options")
    if options.get("task_id", request_id) != request_id:
        raise PoisonMessage(f"its task_id is not {request_id!r}")
    kept = {key: _without_transport(options[key]) for key in _OPTIONS if key in options}
    kept["task_id"] = request_id
    # One producer for a whole release batch: no connection acquired per message.
    task.apply_async(
        args, kwargs, retries=retries, headers=headers, queue=queue, producer=producer, **kept
    )


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
