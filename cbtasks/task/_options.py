"""CircuitBreakerTask's options: their defaults, where they are read from, and their checks."""

from __future__ import annotations

import difflib
import logging
import math
import re
from typing import Any
from urllib.parse import urlencode

import celery
from celery.app import utils as celery_utils

from .. import fallbacks as fb
from .._errors import PolicyError
from .._limit import Limit
from .._policy import BreakerPolicy
from ..stores._base import validate_name
from ..stores._connection import check_url
from ..stores._keys import DEFAULT_PREFIX
from ..stores._outage import OnError
from ._modes import IN_HAND_MODES, MODES

log = logging.getLogger("cbtasks.task")

ON_OPEN = ("defer", "fallback", "fail")
DEFER = tuple(MODES)
#: What defer="pause" does with a request already in hand when the circuit opens.
IN_HAND = tuple(IN_HAND_MODES)
#: Which messages the completion guard looks at.
COMPLETION_CHECK = ("redelivered", "always")
DEFAULTS: dict[str, Any] = {
    "on_open": "defer",
    "defer": "countdown",
    "pause_in_hand": "countdown",
    "max_deferrals": 1000,
    "defer_deadline": 24 * 3600.0,
    "defer_jitter": 1.0,
    # The slow start begins here: a fleet at its concurrency drains faster than
    # this within seconds, and a recovering endpoint sees at most that concurrency.
    "release_rate": 100.0,
    "max_release_rate": math.inf,
    "completion_ttl": 24 * 3600.0,
    # "redelivered": the messages that may have run (redelivered, deferred, or
    # held past half the visibility timeout); the healthy path reads nothing.
    "completion_check": "redelivered",
    "prefix": DEFAULT_PREFIX,
    "on_error": "local",
    # Bounds every Redis call the task makes (breaker, guard, parking lot):
    # past it the call follows on_error instead of stalling the task.
    "redis_timeout": 0.25,
    "gc_every": 25,
    "health_check": None,
    "classify": None,
    "health_interval": 1.0,
    "health_timeout": 5.0,
    "report_state": True,
    # Seconds a request the limit refuses waits in its worker process for a slot
    # before it is deferred; None: LIMIT_WAIT (PAUSE_LIMIT_WAIT with defer="pause"),
    # or the limit's own ``wait`` if longer.
    "limit_wait": None,
}
# Each number option: (least, most, whole numbers only, the least itself allowed).
_NUMBERS: dict[str, tuple[float, float, bool, bool]] = {
    "max_deferrals": (0, 1e9, True, True),
    "gc_every": (0, 1e9, True, True),
    "defer_deadline": (0, 365 * 24 * 3600.0, False, False),
    "defer_jitter": (0, 3600.0, False, True),
    "release_rate": (0, 1e6, False, False),
    "max_release_rate": (0, math.inf, False, False),
    "completion_ttl": (0, 365 * 24 * 3600.0, False, False),
    "health_interval": (0, 3600.0, False, False),
    "health_timeout": (0, 3600.0, False, False),
    "redis_timeout": (0, 60.0, False, False),
    "limit_wait": (0, 24 * 3600.0, False, True),
}


def option(task: celery.Task, name: str) -> Any:
    """A task attribute or decorator option, else ``app.conf.cbtasks_<name>``, else the default."""
    value = getattr(task, name, None)
    if value is None:
        value = task.app.conf.get(f"cbtasks_{name}", DEFAULTS[name])
    return value


def validate_options(cls: type, name: str) -> None:
    """Raise PolicyError, naming the task and the option, for any option that cannot work.

    Checks what the task class sets; :func:`validate_task` checks what it
    ends up with, ``app.conf.cbtasks_*`` settings included.
    """
    _check(name, {key: getattr(cls, key, None) for key in (*DEFAULTS, "fallback", "breaker")})
    coerce_policy(getattr(cls, "breaker_policy", None), f"task {name}: breaker_policy")
    Limit.coerce(getattr(cls, "limit", None), f"task {name}: limit")


def validate_task(task: celery.Task) -> None:
    """Check every option as the task will use it (at worker start): PolicyError if one is bad."""
    values = {key: option(task, key) for key in DEFAULTS if key not in _CALLABLES}
    values["health_check"] = health_check_of(task)
    values["classify"] = classify_of(task)
    values["fallback"] = getattr(task, "fallback", None)
    values["breaker"] = getattr(task, "breaker", None) or task.name
    _check(task.name, values)
    policy_of(task)
    limit_of(task)
    url = redis_url(task.app)
    if url != MEMORY_URL:
        try:
            check_url(url)
        except PolicyError as exc:
            raise PolicyError(f"cbtasks_redis_url: {exc}") from None


def _check(name: str, values: dict[str, Any]) -> None:
    on_open, defer = values.get("on_open"), values.get("defer")
    on_error, prefix = values.get("on_error"), values.get("prefix")
    if on_error is not None and on_error not in {e.value for e in OnError}:
        choices = ", ".join(e.value for e in OnError)
        raise PolicyError(f"task {name}: on_error must be one of {choices}, got {on_error!r}")
    if prefix is not None and (
        not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix
    ):
        raise PolicyError(
            f"task {name}: prefix must be a non-empty string without braces, got {prefix!r}"
        )
    if on_open is not None and on_open not in ON_OPEN:
        raise PolicyError(
            f"task {name}: on_open must be one of {', '.join(ON_OPEN)}, got {on_open!r}"
        )
    if defer is not None and defer not in DEFER:
        raise PolicyError(f"task {name}: defer must be one of {', '.join(DEFER)}, got {defer!r}")
    completion = values.get("completion_check")
    if completion is not None and completion not in COMPLETION_CHECK:
        raise PolicyError(
            f"task {name}: completion_check must be one of {', '.join(COMPLETION_CHECK)}, "
            f"got {completion!r}"
        )
    in_hand = values.get("pause_in_hand")
    if in_hand is not None and in_hand not in IN_HAND:
        raise PolicyError(
            f"task {name}: pause_in_hand must be one of {', '.join(IN_HAND)}, got {in_hand!r}"
        )
    if on_open == "fallback" and values.get("fallback") is None:
        raise PolicyError(f"task {name}: on_open='fallback' needs fallback=...")
    check = values.get("health_check")
    if check is not None and not callable(check):
        raise PolicyError(f"task {name}: health_check must be callable, got {check!r}")
    classify = values.get("classify")
    if classify is not None and not callable(classify):
        raise PolicyError(
            f"task {name}: classify must be a callable taking the exception and returning "
            f"an Outcome or None, got {classify!r}"
        )
    try:
        fb.as_fallback(values.get("fallback"))
    except TypeError as exc:
        raise PolicyError(f"task {name}: {exc}") from None
    if values.get("breaker") is not None:
        try:
            validate_name(values["breaker"])
        except PolicyError as exc:
            raise PolicyError(f"task {name}: breaker: {exc}") from None
    for number, (least, most, whole, least_ok) in _NUMBERS.items():
        value = values.get(number)
        if value is None:
            continue
        kind = "a whole number" if whole else "a number"
        good = (
            isinstance(value, int if whole else int | float)
            and not isinstance(value, bool)
            and not math.isnan(value)
            and (least <= value if least_ok else least < value)
            and value <= most
        )
        if not good:
            bound = "at least" if least_ok else "above"
            raise PolicyError(
                f"task {name}: {number} must be {kind} {bound} {least:g} and at most {most:g}, "
                f"got {value!r}"
            )


# Options that are functions: read from the class, so a plain function stays unbound.
_CALLABLES = ("health_check", "classify")


def _callable_option(task: celery.Task, name: str) -> Any:
    value = getattr(type(task), name, None)
    return value if value is not None else task.app.conf.get(f"cbtasks_{name}")


def health_check_of(task: celery.Task) -> Any:
    """The task's ``health_check``, else ``app.conf.cbtasks_health_check``."""
    return _callable_option(task, "health_check")


def classify_of(task: celery.Task) -> Any:
    """The task's ``classify``, else ``app.conf.cbtasks_classify``: asked before the defaults."""
    return _callable_option(task, "classify")


def policy_of(task: celery.Task) -> BreakerPolicy:
    """The task's ``breaker_policy``, else ``app.conf.cbtasks_policy``, else the defaults;
    either may be a dict of the policy's fields."""
    own = getattr(task, "breaker_policy", None)
    where = f"task {task.name}: breaker_policy" if own is not None else "cbtasks_policy"
    return coerce_policy(own or task.app.conf.get("cbtasks_policy"), where)


def coerce_policy(value: object, where: str) -> BreakerPolicy:
    """A BreakerPolicy from a policy, a dict of its fields or None; PolicyError naming
    ``where`` (the setting) and, for a misspelt field, the field it is likely to be."""
    if value is None:
        return BreakerPolicy()
    if isinstance(value, BreakerPolicy):
        return value
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be a BreakerPolicy or a dict of its fields, got {value!r}")
    fields = list(BreakerPolicy.__dataclass_fields__)
    unknown = [key for key in value if key not in fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise PolicyError(
            f"{where}: unknown field(s) {', '.join(hints)}; the fields are {', '.join(fields)}"
        )
    try:
        return BreakerPolicy(**value)
    except PolicyError as exc:
        raise PolicyError(f"{where}: {exc}") from None


def near_misses(task: celery.Task) -> list[str]:
    """The task's attributes one edit away from a cbtasks option (``brekaer=`` for
    ``breaker=``): Celery keeps any decorator option as an attribute, so a typo is silent."""
    ours = [*DEFAULTS, "breaker", "breaker_policy", "fallback", "limit", "limit_wait"]
    celerys = set(dir(celery.Task))  # dir(), not hasattr(): some are deprecated properties
    said = []
    for attribute in vars(type(task)):
        if attribute.startswith("_") or attribute in ours or attribute in celerys:
            continue
        close = difflib.get_close_matches(attribute, ours, n=1, cutoff=0.85)
        if close:
            said.append(
                f"task {task.name}: option {attribute!r} is not one; did you mean {close[0]!r}?"
            )
    return said


def unknown_settings(app: celery.Celery) -> list[str]:
    """``cbtasks_*`` settings no option reads (a typo: ``cbtasks_polcy``), with a hint."""
    known = {f"cbtasks_{name}" for name in (*DEFAULTS, "policy", "limit", "redis_url")}
    said = []
    for key in list(app.conf.keys()):
        if isinstance(key, str) and key.lower().startswith("cbtasks_") and key.lower() not in known:
            close = difflib.get_close_matches(key.lower(), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            said.append(f"setting {key!r} is read by nothing{hint}")
    return said


def limit_of(task: celery.Task) -> Limit | None:
    """The task's ``limit``, else ``app.conf.cbtasks_limit[<breaker name>]`` (a Limit or
    a dict of its fields), else None."""
    own = getattr(task, "limit", None)
    if own is not None:
        return Limit.coerce(own, f"task {task.name}: limit")
    limits = task.app.conf.get("cbtasks_limit")
    if limits is None:
        return None
    if not isinstance(limits, dict):
        raise PolicyError(
            "cbtasks_limit must be a dict of breaker name -> Limit (or a dict of its fields), "
            f"got {limits!r}"
        )
    name = getattr(task, "breaker", None) or task.name
    return Limit.coerce(limits.get(name), f"cbtasks_limit[{name!r}]")


def lease_of(task: celery.Task) -> float | None:
    """How long a call of ``task`` may hold a slot: its time limit, where it has one."""
    for value in (
        getattr(task, "time_limit", None),
        getattr(task, "soft_time_limit", None),
        task.app.conf.get("task_time_limit"),
        task.app.conf.get("task_soft_time_limit"),
    ):
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


#: Breaker state in this process only (tests, one process): cbtasks_redis_url's value.
MEMORY_URL = "memory://"
_said_memory: set[int] = set()


def redis_url(app: celery.Celery) -> str:
    """``app.conf.cbtasks_redis_url``, else the broker's URL when the broker is Redis
    (kombu's ``sentinel://`` form included, its master named by the broker's
    ``broker_transport_options["master_name"]``), else ``memory://`` for an app that
    runs its tasks eagerly or on the ``memory://`` broker (its own tests)."""
    broker = str(app.conf.broker_url or "")
    url = str(app.conf.get("cbtasks_redis_url") or "")
    if not url and broker.startswith(("redis://", "rediss://", "sentinel://")):
        url = broker
    if not url and (app.conf.task_always_eager or broker.startswith("memory://")):
        if id(app) not in _said_memory:
            _said_memory.add(id(app))
            log.info(
                "cbtasks: %s has no cbtasks_redis_url and runs %s: breaker state is kept in "
                "this process (memory://), shared by no other",
                app.main or "the app",
                "eagerly" if app.conf.task_always_eager else "on the memory:// broker",
            )
        return MEMORY_URL
    if not url:
        raise PolicyError(
            "set app.conf.cbtasks_redis_url to the Redis that keeps breaker state "
            "(the broker is not Redis, so it cannot be used; 'memory://' keeps it in one "
            "process, for tests)"
        )
    if url == broker and url.startswith("sentinel://") and "master_name=" not in url:
        options = app.conf.get("broker_transport_options") or {}
        master = options.get("master_name") if isinstance(options, dict) else None
        if master:
            url += ("&" if "?" in url else "?") + urlencode({"master_name": master})
    return url


def hide_redis_url_from_reports() -> None:
    """Make Celery mask ``cbtasks_redis_url`` where it shows settings.

    ``celery inspect conf``, ``celery report`` and Flower's worker page print
    the app's settings, masking those whose names look secret; a Redis URL
    carries a password, and ``cbtasks_redis_url`` looks like none of them.
    """
    pattern = celery_utils.HIDDEN_SETTINGS.pattern
    if "CBTASKS_REDIS_URL" not in pattern:
        celery_utils.HIDDEN_SETTINGS = re.compile(f"{pattern}|CBTASKS_REDIS_URL", re.IGNORECASE)
