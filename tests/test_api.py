"""The public surface, the original small API, and clear errors on bad input."""

from __future__ import annotations

import ast
import asyncio
import inspect
import pathlib
import pickle

import pytest

import cbtasks
from cbtasks import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    CountWindow,
    MemoryStore,
    PolicyError,
    RedisStore,
    State,
    TimeWindow,
)
from tests.conftest import FakeClock

PACKAGE = pathlib.Path(cbtasks.__file__).parent


def test_public_names_are_exactly_these() -> None:
    """The public surface changes only on purpose."""
    assert set(cbtasks.__all__) >= {
        "BreakerPolicy",
        "CircuitBreaker",
        "CircuitOpenError",
        "MemoryStore",
        "RedisStore",
        "State",
        "StateChange",
    }
    functions = {"default_classify", "report_tokens", "retry_hint", "tokens_of"}  # and classes
    assert sorted(cbtasks.__all__) == sorted(
        name
        for name in dir(cbtasks)
        if not name.startswith("_") and (name[0].isupper() or name in functions)
    )


def test_public_names_report_the_public_module() -> None:
    """Reprs, tracebacks and the API reference say cbtasks.X, not the private module."""
    for name in cbtasks.__all__:
        obj = getattr(cbtasks, name)
        if isinstance(obj, type) or inspect.isfunction(obj):
            assert obj.__module__ == "cbtasks", name
    assert repr(cbtasks.CircuitOpenError("b", 1.0)).startswith("CircuitOpenError(")


def test_the_version_is_the_installed_distributions() -> None:
    """__version__ comes from the package metadata, as stamina's does."""
    from importlib.metadata import version

    assert cbtasks.__version__ == version("cbtasks")


def test_original_small_api() -> None:
    """CircuitBreaker(fail_max, reset_timeout) decorating a plain function."""
    clock = FakeClock()
    breaker = CircuitBreaker(fail_max=3, reset_timeout=5, store=MemoryStore(clock=clock))
    calls = []

    @breaker
    def predict(x: int) -> int:
        calls.append(x)
        if x < 0:
            raise ValueError("endpoint said no")
        return x * 2

    assert predict(2) == 4
    for _ in range(3):
        with pytest.raises(ValueError):
            predict(-1)
    assert breaker.state is State.OPEN
    with pytest.raises(CircuitOpenError) as info:
        predict(5)
    assert calls == [2, -1, -1, -1]
    assert info.value.retry_after == pytest.approx(5)
    clock.advance(5)
    assert predict(5) == 10
    assert breaker.state is State.CLOSED
    assert predict.__name__ == "predict"


def test_async_functions_are_guarded() -> None:
    """The decorator keeps an async function async."""
    breaker = CircuitBreaker(fail_max=1, reset_timeout=60, fallback=lambda: "fallback")

    @breaker
    async def predict() -> str:
        raise TimeoutError

    with pytest.raises(TimeoutError):
        asyncio.run(predict())
    assert asyncio.run(predict()) == "fallback"


def test_shorthands_feed_the_policy() -> None:
    """fail_max and reset_timeout become failure_threshold and open_seconds."""
    breaker = CircuitBreaker(fail_max=7, reset_timeout=900, policy=BreakerPolicy(jitter=0.1))
    assert breaker.policy.failure_threshold == 7
    assert breaker.policy.open_seconds == 900
    assert breaker.policy.max_open_seconds == 900
    assert breaker.policy.jitter == 0.1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_threshold", 0),
        ("failure_threshold", 2.5),
        ("failure_threshold", True),
        ("failure_rate", 0),
        ("failure_rate", 1.5),
        ("failure_rate", float("nan")),
        ("failure_rate", True),
        ("failure_rate", "0.5"),
        ("slow_call_rate", 0),
        ("slow_call_rate", float("inf")),
        ("failure_threshold", 1_000_001),
        ("slow_call_seconds", -1),
        ("min_calls", 0),
        ("open_seconds", 0),
        ("open_seconds", "10"),
        ("backoff_factor", 0.5),
        ("max_open_seconds", 0),
        ("jitter", 2),
        ("half_open_probes", 0),
        ("half_open_successes", 0),
        ("probe_lease_seconds", 0),
        ("honor_retry_after", "yes"),
        ("failure_exceptions", ValueError),
        ("ignored_exceptions", ("not an exception",)),
        ("window", 100),
    ],
)
def test_every_invalid_policy_value_names_its_field(field: str, value: object) -> None:
    """A bad value fails at construction, naming the field first and what it accepts."""
    with pytest.raises(PolicyError, match=rf"^{field} must be "):
        BreakerPolicy(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (
            {"slow_call_rate": 0.5},
            "slow_call_rate needs slow_call_seconds: set slow_call_seconds to the duration "
            "above which a call counts as slow",
        ),
        ({"open_seconds": 60, "max_open_seconds": 30}, "max_open_seconds"),
        ({"window": CountWindow(calls=5), "min_calls": 10}, "min_calls"),
    ],
)
def test_inconsistent_policies_say_what_to_change(kwargs: dict[str, object], words: str) -> None:
    """Fields that contradict each other are caught too."""
    with pytest.raises(PolicyError, match=words):
        BreakerPolicy(**kwargs)  # type: ignore[arg-type]


def test_windows_validate() -> None:
    """Windows have sane sizes; the bounds themselves are allowed."""
    with pytest.raises(PolicyError, match=r"^CountWindow.calls must be "):
        CountWindow(calls=0)
    with pytest.raises(PolicyError, match=r"^TimeWindow.seconds must be "):
        TimeWindow(seconds=-1)
    assert CountWindow(calls=1).calls == 1
    assert TimeWindow(seconds=7 * 24 * 3600.0).seconds == 7 * 24 * 3600.0


def test_policy_bounds_are_inclusive() -> None:
    """The largest values a field allows are allowed."""
    policy = BreakerPolicy(
        failure_threshold=1_000_000,
        open_seconds=7 * 24 * 3600.0,
        max_open_seconds=7 * 24 * 3600.0,
        failure_rate=1,
        slow_call_seconds=7 * 24 * 3600.0,
        slow_call_rate=1.0,
    )
    assert policy.failure_threshold == 1_000_000


def test_policy_is_frozen_and_keyword_only() -> None:
    """Policies are values."""
    policy = BreakerPolicy()
    with pytest.raises(AttributeError):
        policy.failure_threshold = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        BreakerPolicy(3)  # type: ignore[misc]


@pytest.mark.parametrize("name", ["", "x" * 201, "has space", "brace{d}", 42])
def test_bad_breaker_names(name: object) -> None:
    """Empty, oversized or unsafe names are refused with the reason."""
    with pytest.raises(PolicyError, match="name"):
        CircuitBreaker(name)  # type: ignore[arg-type]


def test_shared_breakers_need_a_name() -> None:
    """A RedisStore breaker without a name could not be shared: refused."""
    with pytest.raises(PolicyError, match="needs a name"):
        CircuitBreaker(store=RedisStore("redis://localhost"))


def test_bad_shorthand_names_the_shorthand() -> None:
    """fail_max=0 is reported as fail_max, the name the caller used."""
    with pytest.raises(PolicyError, match="fail_max"):
        CircuitBreaker(fail_max=0)


def test_circuit_open_error_survives_serialization() -> None:
    """Its fields survive being sent back as a task result."""
    error = CircuitOpenError("model-a", 2.5, "circuit is open")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.name, copy.retry_after, str(copy)) == ("model-a", 2.5, str(error))


def test_no_pickle_in_the_package() -> None:
    """JSON only: the library never imports pickle."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all("pickle" not in a.name for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert "pickle" not in (node.module or ""), path


def test_listener_errors_do_not_break_calls() -> None:
    """A failing listener is logged; the call's own result stands."""

    def broken(event: object) -> None:
        raise RuntimeError("listener bug")

    breaker = CircuitBreaker(fail_max=1, listeners=[broken])
    with pytest.raises(KeyError):
        breaker.call(lambda: {}["x"])
    assert breaker.state is State.OPEN
