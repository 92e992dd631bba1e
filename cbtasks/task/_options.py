"""CircuitBreakerTask's options, each declared once: default, check, setting and doc.

:class:`TaskOptions` holds one :class:`TaskOption` per option; the task class
inherits them, Celery's bind resolves them onto the task class (its own value,
else ``app.conf``, else the default), worker start checks the settings, and
docs/tasks.md's table is made from them. A new option is one entry here. Also
here: where breaker state lives (``cbtasks_redis_url``).
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload
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
#: Which messages the completion guard looks at.
COMPLETION_CHECK = ("redelivered", "always")

T = TypeVar("T")
#: An option's check: takes the value and where it came from (``task predict:
#: on_open`` or ``cbtasks_on_open``), returns the value the task uses, or raises
#: PolicyError saying what to change.
Check = Callable[[Any, str], Any]


class TaskOption(Generic[T]):
    """One task option, declared once: its default, its check, the ``app.conf`` setting
    it falls back to, and its doc (the docs' options table is made from these).

    Declared on :class:`TaskOptions`, it is a descriptor: a task class that sets the
    option (a decorator option, as Celery makes them, or a class attribute) shadows
    it, and :meth:`TaskOptions.resolve_options` puts every option's resolved value on
    the task class when Celery binds it to its app, as Celery resolves its own
    ``from_config`` options: one plain attribute read per use afterwards.
    """

    name: str

    def __init__(
        self,
        default: T,
        doc: str,
        *,
        check: Check,
        setting: str | None = "",
        shown: str = "",
        per_breaker: bool = False,
        function: bool = False,
    ) -> None:
        self.default = default
        self.doc = self.__doc__ = doc
        self.check = check
        self._setting = setting
        #: The default as the docs' table shows it (else the default's repr).
        self.shown = shown
        #: The setting is a dict by breaker name (``cbtasks_limit``).
        self.per_breaker = per_breaker
        #: A function kept unbound (``health_check``, ``classify``).
        self.function = function

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @property
    def setting(self) -> str | None:
        """The ``app.conf`` name read when the task does not set the option (None: none)."""
        return f"cbtasks_{self.name}" if self._setting == "" else self._setting

    @overload
    def __get__(self, task: None, owner: type) -> TaskOption[T]: ...
    @overload
    def __get__(self, task: object, owner: type) -> T: ...
    def __get__(self, task: object, owner: type) -> TaskOption[T] | T:
        if task is None:
            return self
        # A task class not bound to an app yet (Celery binds before it runs one):
        # resolve now, from the app the task would use.
        value: T = self.resolve(owner, task.app)  # type: ignore[attr-defined]
        return value

    def declared(self, cls: type) -> Any:
        """What ``cls`` (or a base below the declaration) sets, as it was set; None if nothing."""
        for klass in cls.__mro__:
            own = vars(klass)
            if DECLARED in own:  # a bound class: what it set, before resolution
                if self.name not in own[DECLARED]:
                    continue
                value = own[DECLARED][self.name]
            elif self.name in own:
                value = own[self.name]
            else:
                continue
            if isinstance(value, TaskOption):
                return None
            return value.__func__ if isinstance(value, staticmethod) else value
        return None

    def resolve(self, cls: type, app: Any) -> T:
        """The value a task of ``cls`` uses: its own, else the app's setting, else the
        default; checked (PolicyError naming the task and option, or the setting)."""
        task_name = getattr(cls, "name", None) or cls.__name__
        value, where = self.declared(cls), f"task {task_name}: {self.name}"
        if value is None and self.setting is not None:
            value, where = app.conf.get(self.setting), self.setting
            if self.per_breaker and value is not None:
                value, where = _per_breaker(value, self.setting, cls, app)
        if value is None:
            value = self.default
            if self.name != "breaker":  # the one default that is not a constant
                return value
            value = getattr(cls, "name", None) or cls.__name__
        return self.check(value, where)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<task option {self.name}, default {self.default!r}>"


def _per_breaker(value: object, setting: str, cls: type, app: Any) -> tuple[Any, str]:
    if not isinstance(value, dict):
        raise PolicyError(
            f"{setting} must be a dict of breaker name -> Limit (or a dict of its fields), "
            f"got {value!r}"
        )
    name = TaskOptions.breaker.resolve(cls, app)
    return value.get(name), f"{setting}[{name!r}]"


# -- the checks ------------------------------------------------------------------------


# The checks are classes (so each call runs their code, not a closure made at import),
# named as the phrases they read as where the options are declared.
class one_of:
    """The value is one of ``choices``."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices

    def __call__(self, value: Any, where: str) -> str:
        if value not in self.choices:
            choices = ", ".join(self.choices)
            raise PolicyError(f"{where} must be one of {choices}, got {value!r}")
        return str(value)


class number:
    """A number above ``least`` (or at least it, with ``least_ok``) and at most ``most``."""

    def __init__(
        self, least: float, most: float, *, whole: bool = False, least_ok: bool = False
    ) -> None:
        self.least, self.most, self.whole, self.least_ok = least, most, whole, least_ok

    def __call__(self, value: Any, where: str) -> float:
        least, most = self.least, self.most
        good = (
            isinstance(value, int if self.whole else int | float)
            and not isinstance(value, bool)
            and not math.isnan(value)
            and (least <= value if self.least_ok else least < value)
            and value <= most
        )
        if not good:
            kind = "a whole number" if self.whole else "a number"
            bound = "at least" if self.least_ok else "above"
            raise PolicyError(
                f"{where} must be {kind} {bound} {least:g} and at most {most:g}, got {value!r}"
            )
        return value  # type: ignore[no-any-return]


def a_switch(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{where} must be True or False, got {value!r}")
    return value


def a_prefix(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or "{" in value or "}" in value:
        raise PolicyError(f"{where} must be a non-empty string without braces, got {value!r}")
    return value


def a_breaker_name(value: Any, where: str) -> str:
    try:
        return validate_name(value)
    except PolicyError as exc:
        raise PolicyError(f"{where}: {exc}") from None


class a_function:
    """A callable; else PolicyError saying it must be ``what``."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __call__(self, value: Any, where: str) -> Any:
        if not callable(value):
            raise PolicyError(f"{where} must be {self.what}, got {value!r}")
        return value


def a_fallback(value: Any, where: str) -> fb.Fallback | None:
    try:
        return fb.as_fallback(value)
    except TypeError as exc:
        raise PolicyError(f"{where.rsplit(': ', 1)[0]}: {exc}") from None


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


class TaskOptions:
    """Every option of a :class:`~cbtasks.CircuitBreakerTask`, each declared once here.

    A task sets one as a decorator option or a class attribute; else
    ``app.conf.cbtasks_<option>`` (``cbtasks_policy`` for ``breaker_policy``,
    ``cbtasks_limit[<breaker>]`` for ``limit``); else the default. Bad values fail
    at registration (what the task sets) or at worker start (settings).
    """

    breaker: TaskOption[str] = TaskOption(
        "",
        "the circuit's name: tasks sharing it share one circuit",
        check=a_breaker_name,
        setting=None,
        shown="the task's name",
    )
    breaker_policy: TaskOption[BreakerPolicy] = TaskOption(
        BreakerPolicy(),
        "when it opens, how it probes (a `BreakerPolicy` or a dict of its fields)",
        check=coerce_policy,
        setting="cbtasks_policy",
        shown="`app.conf.cbtasks_policy` or `BreakerPolicy()`",
    )
    on_open: TaskOption[str] = TaskOption(
        "defer",
        '`"defer"`, `"fallback"` or `"fail"` (raise `CircuitOpenError`)',
        check=one_of(*ON_OPEN),
    )
    defer: TaskOption[str] = TaskOption(
        "countdown",
        '`"countdown"`: re-publish with a countdown; `"park"`: keep in Redis until the '
        'circuit closes; `"pause"`: the fleet stops consuming the task\'s queue while the '
        'circuit is open ("Pause mode" in [Celery tasks](tasks.md))',
        check=one_of(*MODES),
    )
    pause_in_hand: TaskOption[str] = TaskOption(
        "countdown",
        'with `defer="pause"`, how a request already taken when the circuit opens waits: '
        '`"countdown"` or `"park"`',
        check=one_of(*IN_HAND_MODES),
    )
    fallback: TaskOption[fb.Fallback | None] = TaskOption(
        None,
        "one of `cbtasks.fallbacks` or a callable taking the task's arguments",
        check=a_fallback,
        setting=None,
        shown="none",
    )
    max_deferrals: TaskOption[int] = TaskOption(
        1000,
        "deferrals allowed; then the fallback, or a visible FAILURE with `CircuitOpenError`",
        check=number(0, 1e9, whole=True, least_ok=True),
    )
    defer_deadline: TaskOption[float] = TaskOption(
        24 * 3600.0,
        "seconds after its first deferral that a request stops being deferred; then as "
        "past `max_deferrals`",
        check=number(0, 365 * 24 * 3600.0),
        shown="24 h",
    )
    defer_jitter: TaskOption[float] = TaskOption(
        1.0,
        "seconds of random spread added to each countdown",
        check=number(0, 3600.0, least_ok=True),
        shown="1 s",
    )
    # The slow start begins here: a fleet at its concurrency drains faster than
    # this within seconds, and a recovering endpoint sees at most that concurrency.
    release_rate: TaskOption[float] = TaskOption(
        100.0,
        "parked requests re-published per second when the circuit closes, doubling every "
        "second it stays closed",
        check=number(0, 1e6),
        shown="100/s",
    )
    max_release_rate: TaskOption[float] = TaskOption(
        math.inf,
        "where that slow start stops growing (no cap: the workers' concurrency is the limit)",
        check=number(0, math.inf),
        shown="no cap",
    )
    completion_ttl: TaskOption[float] = TaskOption(
        24 * 3600.0,
        "how long a completed task id is remembered (where the task has no result backend "
        "to remember it)",
        check=number(0, 365 * 24 * 3600.0),
        shown="24 h",
    )
    # "redelivered": the messages that may have run (redelivered, deferred, or
    # held past half the visibility timeout); the healthy path reads nothing.
    completion_check: TaskOption[str] = TaskOption(
        "redelivered",
        'which messages the completion guard reads a mark for: `"redelivered"` (those '
        'that may have run: see "Completion guard") or `"always"` (one read each)',
        check=one_of(*COMPLETION_CHECK),
    )
    # Bounds every Redis call the task makes: past it the call follows on_error
    # instead of stalling the task.
    redis_timeout: TaskOption[float] = TaskOption(
        0.25,
        "bounds each Redis call of the breaker, the completion guard and the parking lot; "
        "past it the call follows `on_error` (a guard mark not written then can let a "
        "redelivered request call again)",
        check=number(0, 60.0),
        shown="0.25 s",
    )
    report_state: TaskOption[bool] = TaskOption(
        True,
        "while deferred, the result backend's state is `CIRCUIT_OPEN` with `{breaker, "
        "reason, retry_after, deferrals, mode}` (one command per deferral), so "
        "`AsyncResult.state`/`.info` tell a waiting client why",
        check=a_switch,
        shown="on",
    )
    health_check: TaskOption[Callable[[], Any] | None] = TaskOption(
        None,
        "a callable asked while the circuit is open (one process of the fleet, every "
        '`health_interval`); a pass makes it half-open at once (see "Health checks" in '
        "[the breaker](breaker.md))",
        check=a_function("callable"),
        shown="none",
        function=True,
    )
    health_interval: TaskOption[float] = TaskOption(
        1.0,
        "seconds between health checks while the circuit is open",
        check=number(0, 3600.0),
        shown="1 s",
    )
    health_timeout: TaskOption[float] = TaskOption(
        5.0,
        "seconds a health check may take before it counts as failed",
        check=number(0, 3600.0),
        shown="5 s",
    )
    classify: TaskOption[Callable[[BaseException], Any] | None] = TaskOption(
        None,
        "your rule for what a failed call means: a callable taking the exception and "
        "returning an `Outcome`, or None to let the defaults decide",
        check=a_function("a callable taking the exception and returning an Outcome or None"),
        shown="none",
        function=True,
    )
    on_error: TaskOption[str] = TaskOption(
        "local",
        'while Redis cannot be reached: `"local"` (each process keeps its own breaker), '
        '`"admit"` (fail open) or `"reject"` (fail closed)',
        check=one_of(*(e.value for e in OnError)),
    )
    prefix: TaskOption[str] = TaskOption(
        DEFAULT_PREFIX,
        "the prefix of every Redis key and channel (the CLI reads `app.conf.cbtasks_prefix` too)",
        check=a_prefix,
    )
    gc_every: TaskOption[int] = TaskOption(
        25,
        "a full garbage collection every this many deferrals per process (0: never): "
        "a deferred task's traceback cycles otherwise grow a busy worker",
        check=number(0, 1e9, whole=True, least_ok=True),
    )
    limit: TaskOption[Limit | None] = TaskOption(
        None,
        "the endpoint's [limit](limits.md) for the whole fleet (a `Limit` or a dict of its "
        "fields); a request it refuses is deferred as for an open circuit, spending no "
        "retry; a slot's lease defaults to the task's time limit",
        check=Limit.coerce,
        per_breaker=True,
        shown="`app.conf.cbtasks_limit[breaker]`",
    )
    # None: LIMIT_WAIT (PAUSE_LIMIT_WAIT with defer="pause"), or the limit's own
    # ``wait`` if longer.
    limit_wait: TaskOption[float | None] = TaskOption(
        None,
        "seconds a request the limit refuses waits in its process for a slot or permit "
        "before it is deferred (a rate's permit is reserved and slept for; with "
        '`defer="pause"` the worker takes no more of the paused queue meanwhile); 0: at once',
        check=number(0, 24 * 3600.0, least_ok=True),
        shown='1 s (60 s with `defer="pause"`)',
    )

    @classmethod
    def cbtasks_options(cls) -> list[TaskOption[Any]]:
        """Every option, in the order declared."""
        return [v for v in vars(TaskOptions).values() if isinstance(v, TaskOption)]

    @classmethod
    def resolve_options(cls, app: Any) -> None:
        """Put each option's value, resolved for ``app``, on this task class (Celery calls
        this through ``on_bound``). A setting that cannot work is kept, to be raised at
        worker start (where Celery's own settings are checked) and when the task is
        first used; what the class itself sets was checked at registration."""
        if cls is TaskOptions:
            return  # where they are declared: resolving there would hide them
        if DECLARED not in vars(cls):  # bound again: resolve from what it set, again
            setattr(cls, DECLARED, {n: v for n, v in vars(cls).items() if n in _NAMES})
        errors: list[str] = []
        resolved: dict[str, Any] = {}
        for entry in cls.cbtasks_options():
            try:
                resolved[entry.name] = entry.resolve(cls, app)
            except PolicyError as exc:
                errors.append(str(exc))
        if not errors:
            try:
                check_together(getattr(cls, "name", None) or cls.__name__, resolved)
            except PolicyError as exc:
                errors.append(str(exc))
        setattr(cls, ERRORS, errors)
        for name, value in resolved.items():
            function = vars(TaskOptions)[name].function and value is not None
            setattr(cls, name, staticmethod(value) if function else value)

    def cbtasks_check(self) -> None:
        """PolicyError for the first option that cannot work, settings included."""
        errors = vars(type(self)).get(ERRORS)
        if errors is None:  # a class never bound itself (a subclass of a bound one)
            type(self).resolve_options(self.app)  # type: ignore[attr-defined]
            errors = vars(type(self))[ERRORS]
        if errors:
            raise PolicyError(errors[0])


#: Where a bound task class keeps what it set itself, and the settings that cannot work.
DECLARED, ERRORS = "_cbtasks_declared", "_cbtasks_errors"
_NAMES = frozenset(name for name, v in vars(TaskOptions).items() if isinstance(v, TaskOption))
#: Every option's default, by name.
DEFAULTS: dict[str, Any] = {e.name: e.default for e in TaskOptions.cbtasks_options()}


def check_together(task_name: str, values: dict[str, Any]) -> None:
    """What no option can check alone."""
    if values.get("on_open") == "fallback" and values.get("fallback") is None:
        raise PolicyError(f"task {task_name}: on_open='fallback' needs fallback=...")


def option(task: Any, name: str) -> Any:
    """Option ``name`` of any task, a CircuitBreakerTask or not (the gateway's, say)."""
    if isinstance(task, TaskOptions):
        return getattr(task, name)
    return vars(TaskOptions)[name].resolve(type(task), task.app)


def policy_of(task: Any) -> BreakerPolicy:
    """The task's breaker policy: its ``breaker_policy``, else ``cbtasks_policy``."""
    return option(task, "breaker_policy")  # type: ignore[no-any-return]


def validate_options(cls: type) -> None:
    """Raise PolicyError, naming the task and the option, for any option the task class
    sets that cannot work (at registration; settings are checked at worker start)."""
    task_name = getattr(cls, "name", None) or cls.__name__
    values = {}
    for entry in TaskOptions.cbtasks_options():
        value = entry.declared(cls)
        if value is not None:
            value = entry.check(value, f"task {task_name}: {entry.name}")
        values[entry.name] = value
    check_together(task_name, values)


def validate_task(task: Any) -> None:
    """Check every option as the task will use it (at worker start): PolicyError if one is bad.

    Resolved again first: the worker's configuration is final here (a setting
    loaded after the tasks were bound, ``celery worker --config``, counts).
    """
    task.__class__.resolve_options(task.app)  # __class__: a task proxy says its own
    task.cbtasks_check()
    url = redis_url(task.app)
    if url != MEMORY_URL:
        try:
            check_url(url)
        except PolicyError as exc:
            raise PolicyError(f"cbtasks_redis_url: {exc}") from None


def near_misses(task: celery.Task) -> list[str]:
    """The task's attributes one edit away from a cbtasks option (``brekaer=`` for
    ``breaker=``): Celery keeps any decorator option as an attribute, so a typo is silent."""
    ours = sorted(_NAMES)
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
    known = {e.setting for e in TaskOptions.cbtasks_options() if e.setting} | {"cbtasks_redis_url"}
    said = []
    for key in list(app.conf.keys()):
        if isinstance(key, str) and key.lower().startswith("cbtasks_") and key.lower() not in known:
            close = difflib.get_close_matches(key.lower(), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            said.append(f"setting {key!r} is read by nothing{hint}")
    return said


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


def options_table() -> str:
    """docs/tasks.md's table of task options, made from their declarations (each falls
    back to ``app.conf.cbtasks_<option>`` unless its default says otherwise)."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for entry in TaskOptions.cbtasks_options():
        default = entry.default
        shown = entry.shown or (f'`"{default}"`' if isinstance(default, str) else f"{default}")
        rows.append(f"| `{entry.name}` | {shown} | {entry.doc} |")
    return "\n".join(rows) + "\n"


#: Where docs/tasks.md keeps the table (pymdownx.snippets' section markers).
TABLE_START, TABLE_END = "<!-- --8<-- [start:options] -->\n", "\n<!-- --8<-- [end:options] -->"


def table_in(page: str) -> str:
    """The options table as ``page`` (docs/tasks.md's text) has it."""
    start = page.index(TABLE_START) + len(TABLE_START)
    head = page.index("\n", start) + 1  # the line saying where it is made
    return page[head : page.index(TABLE_END, head)]


def with_table(page: str) -> str:
    """``page`` with its options table made again from the declarations."""
    old = table_in(page)
    at = page.index(TABLE_START)
    return page[:at] + page[at:].replace(old, options_table(), 1)
