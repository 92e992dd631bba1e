"""Task options: declared once (default, check, setting, doc), resolved once at bind."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from cbtasks import BreakerPolicy, CircuitBreakerTask, Limit, PolicyError
from cbtasks.task._options import (
    TaskOption,
    TaskOptions,
    options_table,
    table_in,
    validate_task,
)

ROOT = Path(__file__).resolve().parent.parent


def _app(**conf: Any) -> Celery:
    app = Celery("options", set_as_current=False, broker="memory://")
    app.conf.update(task_always_eager=True, task_eager_propagates=True, **conf)
    return app


def test_the_docs_table_is_made_from_the_declarations() -> None:
    """docs/tasks.md's table is what the declarations say, row for row."""
    page = (ROOT / "docs" / "tasks.md").read_text()
    assert table_in(page) == options_table(), "run `make docs-options` and commit docs/tasks.md"
    entries = TaskOptions.cbtasks_options()
    assert [line.split("`")[1] for line in options_table().splitlines()[2:]] == [
        e.name for e in entries
    ]
    for entry in entries:
        assert entry.doc and getattr(TaskOptions, entry.name) is entry
        assert issubclass(CircuitBreakerTask, TaskOptions)  # the task class inherits them


def test_binding_the_base_class_itself_leaves_its_subclasses_alone() -> None:
    """``task.app = app`` binds CircuitBreakerTask itself (Celery's app setter): its
    resolved values are not what a task class made later sets."""
    before = set(vars(CircuitBreakerTask))
    try:
        base = CircuitBreakerTask()
        base.app = _app(cbtasks_on_open="fail")
        assert vars(CircuitBreakerTask)["on_open"] == "fail"
        app = _app(cbtasks_gc_every=3)

        @app.task(base=CircuitBreakerTask, shared=False, name=f"later-{uuid.uuid4()}")
        def predict() -> None:
            """Made after the base was bound."""

        app.finalize(auto=True)
        assert (predict.on_open, predict.gc_every) == ("defer", 3)
    finally:
        for added in set(vars(CircuitBreakerTask)) - before:
            delattr(CircuitBreakerTask, added)


def test_options_are_resolved_once_when_the_task_is_bound() -> None:
    """Its own value, else the app's setting, else the default: put on the task class when
    Celery binds it (as Celery resolves its from_config options), read as plain attributes."""
    app = _app(
        cbtasks_on_open="fail",
        cbtasks_policy={"failure_threshold": 2},
        cbtasks_limit={"iris": {"concurrency": 3}},
    )

    @app.task(base=CircuitBreakerTask, shared=False, breaker="iris", defer="park")
    def predict() -> None:
        """A task with some options set, some from settings."""

    app.finalize(auto=True)
    resolved = vars(predict.__class__)
    assert resolved["on_open"] == "fail" and predict.on_open == "fail"
    assert resolved["defer"] == "park"
    assert resolved["breaker_policy"] == BreakerPolicy(failure_threshold=2)
    assert resolved["limit"] == Limit(concurrency=3)
    assert resolved["max_deferrals"] == 1000  # the default
    app.conf.cbtasks_on_open = "defer"  # after bind: not read again, as Celery's own
    assert predict.on_open == "fail"


def test_a_worker_resolves_them_again_at_its_start() -> None:
    """A setting loaded after the tasks were bound (the worker's own configuration)
    counts in a worker: its start resolves and checks the options again."""
    app = _app()
    app.conf.cbtasks_redis_url = "redis://127.0.0.1:1/0"

    @app.task(base=CircuitBreakerTask, shared=False)
    def predict() -> None:
        """Configured late."""

    app.finalize(auto=True)
    assert predict.on_open == "defer"
    app.conf.cbtasks_on_open = "fail"
    validate_task(predict)  # what worker start does for each task (_check_options)
    assert predict.on_open == "fail"
    app.conf.cbtasks_on_open = "explode"
    with pytest.raises(PolicyError, match="cbtasks_on_open"):
        validate_task(predict)


def test_a_task_bound_again_resolves_from_what_it_set() -> None:
    """Bound to another app: its own options stay, the settings are that app's."""
    first = _app(cbtasks_gc_every=5)

    @first.task(base=CircuitBreakerTask, shared=False, defer_jitter=0.5)
    def predict() -> None:
        """Bound twice."""

    first.finalize(auto=True)
    assert (predict.gc_every, predict.defer_jitter) == (5, 0.5)
    predict.__class__.bind(_app(cbtasks_gc_every=7, cbtasks_defer_jitter=3.0))
    assert (predict.gc_every, predict.defer_jitter) == (7, 0.5)


def test_a_function_option_stays_a_plain_function() -> None:
    """health_check, classify and a function fallback are not bound to the task: a plain
    function fallback used to be called with the task as its first argument."""

    def healthy() -> bool:
        return True

    app = _app()

    @app.task(
        base=CircuitBreakerTask,
        shared=False,
        name=f"plain-{uuid.uuid4()}",
        health_check=healthy,
        on_open="fallback",
        fallback=lambda features: {"label": "default", "features": features},
    )
    def predict(features: list[float]) -> dict[str, Any]:
        """Its circuit is forced open below."""
        raise AssertionError("an open circuit calls nothing")

    app.finalize(auto=True)
    assert predict.health_check is healthy
    predict.cbtasks_breaker.force_open()
    answer = predict.delay([1.0]).get()
    assert answer["result"] == {"label": "default", "features": [1.0]}
    assert answer["cbtasks_fallback"] == "callable"


def test_a_setting_that_cannot_work_fails_its_first_use_too() -> None:
    """Worker start stops on it; an eager call (no worker start) is refused naming the
    setting, where it used to treat on_open='explode' as defer."""
    app = _app(cbtasks_on_open="explode")

    @app.task(base=CircuitBreakerTask, shared=False, name=f"bad-{uuid.uuid4()}")
    def predict() -> str:
        """Its app's setting is bad."""
        return "called"

    app.finalize(auto=True)
    with pytest.raises(PolicyError, match="cbtasks_on_open must be one of defer, fallback"):
        predict.delay().get()


@pytest.mark.parametrize(
    "entry", [e for e in TaskOptions.cbtasks_options() if e.setting], ids=lambda e: e.name
)
def test_every_setting_is_checked_as_the_option_is(entry: TaskOption[Any]) -> None:
    """An app setting no option could take is refused naming the setting, for each option
    that has one (breaker and fallback are the task's own only)."""
    setting = {"per": {"iris": object()}} if entry.per_breaker else {"per": object()}
    app = _app(**{entry.setting: setting["per"]})

    @app.task(base=CircuitBreakerTask, shared=False, breaker="iris")
    def predict() -> None:
        """A task whose setting is bad."""

    app.finalize(auto=True)
    with pytest.raises(PolicyError, match=entry.setting):
        predict.cbtasks_check()


def test_what_no_option_checks_alone_is_checked_with_the_settings() -> None:
    """on_open='fallback' from the app's setting, on a task without a fallback: refused."""
    app = _app(cbtasks_on_open="fallback")

    name = f"nofb-{uuid.uuid4()}"

    @app.task(base=CircuitBreakerTask, shared=False, name=name)
    def predict() -> None:
        """No fallback."""

    app.finalize(auto=True)
    with pytest.raises(PolicyError, match=rf"^task {name}: on_open='fallback' needs fallback"):
        predict.cbtasks_check()


def test_the_default_breaker_is_the_tasks_name() -> None:
    app = _app()

    @app.task(base=CircuitBreakerTask, shared=False, name="models.iris.predict")
    def predict() -> None:
        """Named apart from its function."""

    app.finalize(auto=True)
    assert predict.breaker == "models.iris.predict" == predict.cbtasks_breaker_name


def test_an_option_resolved_by_hand_names_the_task_and_the_setting() -> None:
    """TaskOption.resolve, as a task class not bound yet reads it: what the class sets
    first (named by the task), else the setting (named by itself), else the default."""

    class Probe(TaskOptions):
        name = "probe"
        on_open = "explode"

    with pytest.raises(PolicyError, match=r"^task probe: on_open must be one of"):
        TaskOptions.on_open.resolve(Probe, _app())
    assert TaskOptions.defer.resolve(Probe, _app(cbtasks_defer="park")) == "park"
    assert TaskOptions.gc_every.resolve(Probe, _app()) == 25
    assert TaskOptions.breaker.resolve(Probe, _app()) == "probe"
    with pytest.raises(PolicyError, match=r"^cbtasks_limit must be a dict of breaker name"):
        TaskOptions.limit.resolve(Probe, _app(cbtasks_limit=Limit(concurrency=2)))
    limits = _app(cbtasks_limit={"probe": {"rate": "5/s"}, "other": {"concurrency": 1}})
    assert TaskOptions.limit.resolve(Probe, limits) == Limit(rate="5/s")


WHOLE = "a whole number at least 0 and at most 1e+09"


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"max_deferrals": 2.5}, f"max_deferrals must be {WHOLE}, got 2.5"),
        ({"release_rate": 0}, "release_rate must be a number above 0 and at most 1e+06, got 0"),
        ({"redis_timeout": 60.5}, "redis_timeout must be a number above 0 and at most 60,"),
        ({"on_open": "fallback"}, "task models.predict: on_open='fallback' needs fallback=..."),
        ({"defer": "later"}, "task models.predict: defer must be one of countdown, park, pause"),
    ],
)
def test_a_refused_option_says_the_task_the_option_and_the_bounds(
    options: dict[str, Any], said: str
) -> None:
    app = _app()

    def predict() -> None:
        """Never registered."""

    with pytest.raises(PolicyError) as refused:
        app.task(base=CircuitBreakerTask, shared=False, name="models.predict", **options)(predict)
        app.finalize(auto=True)
    assert said in str(refused.value)


@pytest.mark.parametrize(
    "options",
    [{"defer_jitter": 0}, {"max_deferrals": 0}, {"redis_timeout": 60}, {"limit_wait": 0}],
)
def test_the_bounds_themselves_are_taken_where_they_are_allowed(options: dict[str, Any]) -> None:
    app = _app()

    @app.task(base=CircuitBreakerTask, shared=False, name=f"edge-{uuid.uuid4()}", **options)
    def predict() -> None:
        """At a bound."""

    app.finalize(auto=True)
    name, value = next(iter(options.items()))
    assert getattr(predict, name) == value


def test_a_base_class_of_your_own_sets_options_for_its_tasks() -> None:
    """Options on a base class between yours and CircuitBreakerTask count, even when a
    class between them was bound already (its own resolved values are not read)."""

    def healthy() -> bool:
        return True

    class ModelTask(CircuitBreakerTask):
        gc_every = 5
        health_check = staticmethod(healthy)

    class Middle(ModelTask):
        """Sets nothing itself."""

    class IrisTask(Middle):
        defer = "park"

    IrisTask.bind(_app())  # a class in the middle, bound (as Celery's app setter does)
    app = _app()

    @app.task(base=IrisTask, shared=False, name=f"base-{uuid.uuid4()}")
    def predict() -> None:
        """Its options come from its bases."""

    app.finalize(auto=True)
    assert (predict.gc_every, predict.defer, predict.health_check) == (5, "park", healthy)


def test_a_class_not_bound_itself_reads_and_checks_its_options_on_use() -> None:
    """A subclass of a bound class is not bound by Celery on use: it reads its options
    from its app when asked, and its check resolves them first."""

    class Base(CircuitBreakerTask):
        name = "base"

    Base.bind(_app())

    class Late(Base):
        name = "late"

    Late._app = _app(cbtasks_on_open="fail", cbtasks_defer="explode")
    assert "on_open" not in vars(Late)
    with pytest.raises(PolicyError, match="cbtasks_defer must be one of"):
        Late().cbtasks_check()
    assert vars(Late)["on_open"] == Late().on_open == "fail"  # resolved onto it by the check

    class Probe(TaskOptions):  # nothing resolved anywhere above it: the declaration reads
        name = "probe"
        app = _app(cbtasks_on_open="fail")

    assert Probe().on_open == "fail" and Probe().gc_every == 25


def test_the_table_is_replaced_where_it_stands_and_nowhere_else() -> None:
    from cbtasks.task._options import TABLE_END, TABLE_START, with_table

    page = (
        f"intro\n{TABLE_START}<!-- made here -->\n| old |\n{TABLE_END}\n"
        f"after, quoting the marker: {TABLE_END}\n"
    )
    made = with_table(page)
    assert table_in(made) == options_table()
    assert made.startswith(f"intro\n{TABLE_START}<!-- made here -->\n| option |")
    assert made.endswith(f"{TABLE_END}\nafter, quoting the marker: {TABLE_END}\n")


def test_a_second_app_with_a_task_of_the_same_name_gets_its_own_breaker() -> None:
    """As a test suite makes a fresh app per test: the second task of the same name gets a
    breaker with its own options, where it used to get the first one's (kept per name)."""
    name = f"same-{uuid.uuid4()}"
    made = []
    for threshold in (2, 7):
        app = _app()

        @app.task(base=CircuitBreakerTask, shared=False, name=name,
                  breaker_policy={"failure_threshold": threshold})  # fmt: skip
        def predict() -> None:
            """The same name in each app."""

        app.finalize(auto=True)
        made.append(predict.cbtasks_breaker)
    assert [b.policy.failure_threshold for b in made] == [2, 7]
    assert made[0] is not made[1] and made[0].name == made[1].name == name
