"""Classification as one part: the defaults, a user's rule composed with them, retry hints."""

from __future__ import annotations

import datetime
import logging
from email.utils import format_datetime
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from cbtasks import (
    BreakerPolicy,
    CallerError,
    CircuitBreaker,
    CircuitBreakerTask,
    CircuitOpenError,
    EndpointFailure,
    Outcome,
    PolicyError,
    State,
    default_classify,
    retry_hint,
)
from cbtasks._classify import http_status_outcome
from cbtasks.task._task import _check_options


class BadInput(Exception):
    """A user's own caller error."""


class Flaky(Exception):
    """A user's own endpoint trouble."""


def fail_with(exc: BaseException) -> Any:
    raise exc


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (400, Outcome.IGNORED),
        (401, Outcome.IGNORED),
        (403, Outcome.IGNORED),
        (404, Outcome.IGNORED),
        (413, Outcome.IGNORED),
        (422, Outcome.IGNORED),
        (408, Outcome.FAILURE),
        (424, Outcome.FAILURE),
        (425, Outcome.FAILURE),
        (429, Outcome.OVERLOAD),
        (500, Outcome.FAILURE),
        (503, Outcome.FAILURE),
        (599, Outcome.FAILURE),
        (200, None),
        (302, None),
    ],
)
def test_what_each_http_status_means(status: int, outcome: Outcome | None) -> None:
    """5xx and the three "not now" 4xx count, 429 is busy; the other 4xx are the caller's."""
    assert http_status_outcome(status) is outcome


def test_ignored_exceptions_add_to_the_defaults() -> None:
    """The README's own example: CallerError stays ignored when a class is added."""
    breaker = CircuitBreaker(
        policy=BreakerPolicy(failure_threshold=1, ignored_exceptions=(BadInput,))
    )
    for exc in (BadInput("x"), CallerError("422")):
        with pytest.raises(type(exc)):
            breaker.call(fail_with, exc)
    assert breaker.state is State.CLOSED
    with pytest.raises(EndpointFailure):
        breaker.call(fail_with, EndpointFailure("503"))
    assert breaker.state is State.OPEN


def test_the_breakers_rule_comes_before_the_policys_and_the_defaults() -> None:
    """Breaker's classify, then the policy's, then the defaults: each None passes it on."""
    seen: list[str] = []

    def breaker_rule(exc: BaseException) -> Outcome | None:
        seen.append("breaker")
        return Outcome.IGNORED if isinstance(exc, Flaky) and exc.args == ("ours",) else None

    def policy_rule(exc: BaseException) -> Outcome | None:
        seen.append("policy")
        return Outcome.FAILURE if isinstance(exc, CallerError) else None

    breaker = CircuitBreaker(
        policy=BreakerPolicy(failure_threshold=5, classify=policy_rule), classify=breaker_rule
    )
    assert breaker.classify(Flaky("ours")) is Outcome.IGNORED
    assert seen == ["breaker"]
    assert breaker.classify(CallerError("the team counts these")) is Outcome.FAILURE
    assert breaker.classify(EndpointFailure("down")) is Outcome.FAILURE
    assert breaker.classify(ValueError("unknown: failure_exceptions decide")) is Outcome.FAILURE
    assert seen == ["breaker", "breaker", "policy", "breaker", "policy", "breaker", "policy"]


def test_a_rule_that_fails_or_answers_nonsense_leaves_it_to_the_defaults(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The caller still sees its own exception; the rule's fault is logged."""

    def broken(exc: BaseException) -> Outcome | None:
        raise RuntimeError("bug in the rule")

    def nonsense(exc: BaseException) -> Any:
        return "failure"

    for rule in (broken, nonsense):
        breaker = CircuitBreaker(fail_max=1, classify=rule)
        with caplog.at_level(logging.ERROR, "cbtasks"), pytest.raises(CallerError):
            breaker.call(fail_with, CallerError("400"))
        assert breaker.state is State.CLOSED
    assert "bug in the rule" in caplog.text and "return an Outcome or None" in caplog.text


@pytest.mark.parametrize("bad", ["ignore 4xx", 42])
def test_a_classify_that_is_not_callable_is_refused(bad: Any) -> None:
    """On the breaker and on the policy, with what to pass instead."""
    with pytest.raises(PolicyError, match="classify must be a callable"):
        CircuitBreaker(classify=bad)
    with pytest.raises(PolicyError, match="classify must be a callable"):
        BreakerPolicy(classify=bad)


def test_failure_exceptions_still_bound_what_counts() -> None:
    """Outside failure_exceptions nothing is a failure, whatever the defaults know."""
    breaker = CircuitBreaker(policy=BreakerPolicy(failure_threshold=1, failure_exceptions=(Flaky,)))
    with pytest.raises(TimeoutError):
        breaker.call(fail_with, TimeoutError("slow"))
    assert breaker.state is State.CLOSED
    with pytest.raises(Flaky):
        breaker.call(fail_with, Flaky("down"))
    assert breaker.state is State.OPEN


def test_an_exception_carrying_an_http_status_is_judged_by_it() -> None:
    """A user's own exception with status_code (or response.status_code) is read."""

    class ApiError(Exception):
        def __init__(self, status_code: int) -> None:
            self.status_code = status_code

    class WithResponse(Exception):
        response = SimpleNamespace(status_code=404)

    assert default_classify(ApiError(422)) is Outcome.IGNORED
    assert default_classify(ApiError(502)) is Outcome.FAILURE
    assert default_classify(WithResponse()) is Outcome.IGNORED
    assert default_classify(ValueError("no status")) is None


def test_a_not_ready_answer_is_the_endpoints_whatever_its_4xx() -> None:
    """MLServer's "Model x is not ready yet." comes as a 400: the server's state."""

    class ApiError(Exception):
        status_code = 400

    assert default_classify(ApiError("Model iris is not ready yet.")) is Outcome.FAILURE
    assert default_classify(ApiError("features must be 4 numbers")) is Outcome.IGNORED


# -- retry hints ---------------------------------------------------------------------


def carrying(headers: dict[str, str]) -> Exception:
    exc = Exception("429")
    exc.response = SimpleNamespace(headers=headers)  # type: ignore[attr-defined]
    return exc


def test_retry_hints_from_every_form() -> None:
    """Seconds, an HTTP date, retry-after-ms, a botocore response, our own retry_after."""
    assert retry_hint(carrying({"Retry-After": "120"})) == 120.0
    assert retry_hint(carrying({"retry-after-ms": "1500"})) == 1.5
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=600)
    hint = retry_hint(carrying({"Retry-After": format_datetime(later, usegmt=True)}))
    assert hint is not None and 590 < hint <= 600
    boto = Exception("throttled")
    boto.response = {"ResponseMetadata": {"HTTPHeaders": {"retry-after": "7"}}}  # type: ignore[attr-defined]
    assert retry_hint(boto) == 7.0
    assert retry_hint(EndpointFailure("busy", retry_after=3.0)) == 3.0
    assert retry_hint(carrying({"Retry-After": "soon"})) is None
    assert retry_hint(ValueError("nothing")) is None
    assert retry_hint(CircuitOpenError("b", 5.0)) is None


def test_an_hour_is_the_most_an_endpoint_can_ask() -> None:
    """Retry-After: 1e9 keeps the circuit open for an hour, not thirty years."""
    breaker = CircuitBreaker(fail_max=3, reset_timeout=30)
    with pytest.raises(Exception, match="429"):
        breaker.call(fail_with, carrying({"Retry-After": "1000000000"}))
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(lambda: None)
    assert 3590 <= info.value.retry_after <= 3600


# -- the task option ----------------------------------------------------------------------


def only_quota(exc: BaseException) -> Outcome | None:
    """The app's rule: a quota error is the caller's."""
    return Outcome.IGNORED if "quota" in str(exc) else None


def test_the_task_option_and_the_app_setting_reach_the_tasks_breaker() -> None:
    """classify= on the task, else app.conf.cbtasks_classify, is the breaker's first rule."""
    app = Celery("classify", set_as_current=False)
    app.conf.cbtasks_redis_url = "redis://127.0.0.1:1/0"
    app.conf.cbtasks_classify = only_quota

    @app.task(base=CircuitBreakerTask, shared=False)
    def by_setting() -> None:
        """Judged by the app's rule."""

    @app.task(base=CircuitBreakerTask, shared=False, classify=lambda exc: Outcome.FAILURE)
    def by_option() -> None:
        """Judged by its own rule."""

    app.finalize(auto=True)
    try:
        assert by_setting.cbtasks_breaker.classify(EndpointFailure("quota")) is Outcome.IGNORED
        assert by_setting.cbtasks_breaker.classify(EndpointFailure("503")) is Outcome.FAILURE
        assert by_option.cbtasks_breaker.classify(CallerError("400")) is Outcome.FAILURE
    finally:
        by_setting.cbtasks_store.close()
        by_option.cbtasks_store.close()


def test_a_bad_classify_fails_at_registration_and_at_worker_start() -> None:
    """A task option is refused when registered; an app setting stops the worker."""

    def refused() -> None:
        """A task that must never be registered."""

    app = Celery("bad-classify", set_as_current=False)
    with pytest.raises(PolicyError, match="classify must be a callable"):
        app.task(base=CircuitBreakerTask, shared=False, classify="4xx")(refused)
        app.finalize(auto=True)
    app = Celery("bad-classify-setting", set_as_current=False)
    app.conf.cbtasks_redis_url = "redis://127.0.0.1:1/0"
    app.conf.cbtasks_classify = "4xx"

    @app.task(base=CircuitBreakerTask, shared=False)
    def predict() -> None:
        """A task whose app setting is bad."""

    app.finalize(auto=True)
    with pytest.raises(SystemExit, match="classify"):
        _check_options(sender=SimpleNamespace(app=app))


# -- a bug is not an outage ------------------------------------------------------------


def _own_type_error() -> None:
    len(5)  # type: ignore[arg-type]  # the caller's own mistake


def _library_type_error() -> None:
    import json

    json.loads(5)  # type: ignore[arg-type]  # raised inside the standard library


@pytest.mark.parametrize(
    "bug",
    [
        lambda: undefined_name,  # type: ignore[name-defined]  # noqa: F821
        lambda: __import__("no_such_module_here"),
        lambda: compile("def (", "<task>", "exec"),
        lambda: (_ for _ in ()).throw(NotImplementedError("todo")),
        _own_type_error,
        lambda: None.label,  # type: ignore[union-attr]
    ],
    ids=[
        "NameError",
        "ImportError",
        "SyntaxError",
        "NotImplementedError",
        "TypeError",
        "AttributeError",
    ],
)
def test_a_bug_in_the_callers_code_never_opens_the_circuit(bug: Any) -> None:
    """The task's own bug fails the call (its exception, with its traceback) and leaves the
    circuit closed for everyone else."""
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30)
    for _ in range(3):
        with pytest.raises(Exception) as info:
            breaker.call(bug)
        assert not isinstance(info.value, CircuitOpenError)
    assert breaker.state is State.CLOSED


def test_a_type_error_inside_a_library_still_counts() -> None:
    """A TypeError a library raises reading an odd answer may be the endpoint's doing."""
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30)
    with pytest.raises(TypeError):
        breaker.call(_library_type_error)
    assert breaker.state is State.OPEN


def test_a_users_rule_can_call_a_bug_a_failure() -> None:
    """classify= is asked first: a team that wants NameErrors to open the circuit says so."""
    breaker = CircuitBreaker(
        fail_max=1,
        reset_timeout=30,
        classify=lambda exc: Outcome.FAILURE if isinstance(exc, NameError) else None,
    )
    with pytest.raises(NameError):
        breaker.call(lambda: undefined_name)  # type: ignore[name-defined]  # noqa: F821
    assert breaker.state is State.OPEN
