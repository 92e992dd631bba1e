"""CircuitBreakerTask's options: their defaults, where they are read from, and their checks."""

from __future__ import annotations

import math
from typing import Any

import celery

from .. import fallbacks as fb
from .._errors import PolicyError
from .._policy import BreakerPolicy

ON_OPEN = ("defer", "fallback", "fail")
DEFER = ("countdown", "park")
DEFAULTS: dict[str, Any] = {
    "on_open": "defer",
    "defer": "countdown",
    "max_deferrals": 1000,
    "defer_deadline": 24 * 3600.0,
    "defer_jitter": 1.0,
    "release_rate": 20.0,
    "max_release_rate": math.inf,
    "completion_ttl": 24 * 3600.0,
    "prefix": "cbtasks",
    "on_error": "local",
    "gc_every": 25,
    "health_check": None,
    "health_interval": 1.0,
}
_NUMBERS = (
    "max_deferrals",
    "defer_deadline",
    "defer_jitter",
    "release_rate",
    "max_release_rate",
    "completion_ttl",
    "health_interval",
)


def option(task: celery.Task, name: str) -> Any:
    """A task attribute or decorator option, else ``app.conf.cbtasks_<name>``, else the default."""
    value = getattr(task, name, None)
    if value is None:
        value = task.app.conf.get(f"cbtasks_{name}", DEFAULTS[name])
    return value


def validate_options(cls: type, name: str) -> None:
    """Raise PolicyError, naming the task and the option, for any option that cannot work."""
    on_open = getattr(cls, "on_open", None)
    if on_open is not None and on_open not in ON_OPEN:
        raise PolicyError(
            f"task {name}: on_open must be one of {', '.join(ON_OPEN)}, got {on_open!r}"
        )
    defer = getattr(cls, "defer", None)
    if defer is not None and defer not in DEFER:
        raise PolicyError(f"task {name}: defer must be one of {', '.join(DEFER)}, got {defer!r}")
    if on_open == "fallback" and getattr(cls, "fallback", None) is None:
        raise PolicyError(f"task {name}: on_open='fallback' needs fallback=...")
    policy = getattr(cls, "breaker_policy", None)
    if policy is not None and not isinstance(policy, BreakerPolicy):
        raise PolicyError(f"task {name}: breaker_policy must be a BreakerPolicy, got {policy!r}")
    check = getattr(cls, "health_check", None)
    if check is not None and not callable(check):
        raise PolicyError(f"task {name}: health_check must be callable, got {check!r}")
    try:
        fb.as_fallback(getattr(cls, "fallback", None))
    except TypeError as exc:
        raise PolicyError(f"task {name}: {exc}") from None
    for number in _NUMBERS:
        value = getattr(cls, number, None)
        if value is not None and (not isinstance(value, int | float) or value < 0):
            raise PolicyError(
                f"task {name}: {number} must be a number of at least 0, got {value!r}"
            )


def health_check_of(task: celery.Task) -> Any:
    """The task's ``health_check`` as given: read from the class, so a function stays unbound."""
    check = getattr(type(task), "health_check", None)
    return check if check is not None else task.app.conf.get("cbtasks_health_check")


def policy_of(task: celery.Task) -> BreakerPolicy:
    """The task's ``breaker_policy``, else ``app.conf.cbtasks_policy``, else the defaults."""
    policy = getattr(task, "breaker_policy", None) or task.app.conf.get("cbtasks_policy")
    if policy is None:
        return BreakerPolicy()
    if isinstance(policy, dict):
        return BreakerPolicy(**policy)
    if not isinstance(policy, BreakerPolicy):
        raise PolicyError(
            f"cbtasks_policy must be a BreakerPolicy or a dict of its fields, got {policy!r}"
        )
    return policy


def redis_url(app: celery.Celery) -> str:
    """``app.conf.cbtasks_redis_url``, else the broker's URL when the broker is Redis."""
    url = app.conf.get("cbtasks_redis_url")
    if url:
        return str(url)
    broker = str(app.conf.broker_url or "")
    if broker.startswith(("redis://", "rediss://")):
        return broker
    raise PolicyError(
        "set app.conf.cbtasks_redis_url to the Redis that keeps breaker state "
        "(the broker is not Redis, so it cannot be used)"
    )
