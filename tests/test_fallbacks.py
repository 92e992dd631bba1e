"""The fallbacks on their own: what each answers, and that answers are marked."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from cbtasks import fallbacks as fb


class FakeTask:
    """Just what fallbacks use of a task: a name, a prefix, a Redis, apply_async."""

    name = "workers.predict"
    cbtasks_prefix = "cbtasks"

    def __init__(self, url: str) -> None:
        self.cbtasks_redis = redis.Redis.from_url(url)
        self.sent: list[tuple[Any, ...]] = []

    def apply_async(self, args: Any, kwargs: Any, **options: Any) -> Any:
        self.sent.append((args, kwargs, options))
        return type("Result", (), {"id": "later-1"})()


def test_cached_result_answers_with_the_last_good_result(redis_url: str) -> None:
    """Remembered per arguments; a miss goes to `otherwise`, else NoFallback."""
    task = FakeTask(redis_url)
    cache = fb.CachedResult(ttl=60, otherwise=None)
    cache.remember(task, ([1, 2, 3, 4],), {}, {"label": "setosa"})
    assert cache(task, ([1, 2, 3, 4],), {}) == {"label": "setosa"}
    with pytest.raises(fb.NoFallback):
        cache(task, ([9, 9, 9, 9],), {})
    backed = fb.CachedResult(ttl=60, otherwise=fb.DefaultPrediction("unknown"))
    assert backed(task, ([9, 9, 9, 9],), {}) == "unknown"


def test_enqueue_for_later_sends_the_request_and_answers_now(redis_url: str) -> None:
    """The request goes to the named queue; the answer says where."""
    task = FakeTask(redis_url)
    answer = fb.EnqueueForLater("batch")(task, ([1, 2, 3, 4],), {})
    assert answer == {"queued": True, "task_id": "later-1", "queue": "batch"}
    assert task.sent[0][2]["queue"] == "batch"


def test_simpler_model_and_plain_callables(redis_url: str) -> None:
    """Another model, or any callable, answers with the task's arguments."""
    task = FakeTask(redis_url)
    assert fb.SimplerModel(lambda x: x * 2)(task, (21,), {}) == 42
    plain = fb.as_fallback(lambda x: x + 1)
    assert plain is not None and plain.kind == "callable" and plain(task, (1,), {}) == 2


def test_results_are_marked() -> None:
    """A pipeline can tell a fallback's answer from the endpoint's."""
    marked = fb.mark("default", {"label": "unknown"}, "circuit is open")
    assert fb.is_fallback(marked) and not fb.is_fallback({"label": "setosa"})


def test_bad_fallbacks_fail_early() -> None:
    """Mistakes show when the fallback is made, not during an outage."""
    with pytest.raises(TypeError):
        fb.DefaultPrediction(object())
    with pytest.raises(ValueError, match="ttl"):
        fb.CachedResult(ttl=0)
    with pytest.raises(ValueError, match="^EnqueueForLater needs the name of the queue"):
        fb.EnqueueForLater("")
    with pytest.raises(TypeError, match="callable"):
        fb.as_fallback(42)


def test_cached_result_is_keyed_on_keyword_arguments_too(redis_url: str) -> None:
    """A result saved for predict(x=1) is never the answer for predict(x=2)."""
    task = FakeTask(redis_url)
    cache = fb.CachedResult(ttl=60, otherwise=None)
    cache.remember(task, (), {"x": 1}, "one")
    assert cache(task, (), {"x": 1}) == "one"
    with pytest.raises(fb.NoFallback):
        cache(task, (), {"x": 2})
    with pytest.raises(fb.NoFallback):
        cache(task, (1,), {})  # the same value passed by position is another call


def test_an_unreachable_cache_is_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    """Redis out of reach: the fallback behind the cache answers, nothing is raised; logged."""
    task = FakeTask("redis://127.0.0.1:1/0")  # nothing listens on port 1
    backed = fb.CachedResult(ttl=60, otherwise=fb.DefaultPrediction("unknown"))
    assert backed(task, ([1, 2, 3, 4],), {}) == "unknown"
    assert any(
        record.getMessage().startswith("cannot read the cached result of workers.predict (")
        for record in caplog.records
    )
    assert "Connection refused" in caplog.text or "Error" in caplog.text


def test_the_mark_names_the_fallback_that_answered(redis_url: str) -> None:
    """A CachedResult with nothing cached answers with its `otherwise`: "default", not "cached"."""
    task = FakeTask(redis_url)
    cache = fb.CachedResult(ttl=60, otherwise=fb.DefaultPrediction(None))
    assert fb.answer(cache, task, ([1, 2, 3, 4],), {}) == ("default", None)
    cache.remember(task, ([1, 2, 3, 4],), {}, {"label": "setosa"})
    assert fb.answer(cache, task, ([1, 2, 3, 4],), {}) == ("cached", {"label": "setosa"})


def test_the_mark_holds_kind_result_and_reason() -> None:
    """Exactly these three keys: a pipeline reads them."""
    assert fb.mark("default", 7, "circuit is open") == {
        "cbtasks_fallback": "default",
        "result": 7,
        "reason": "circuit is open",
    }


def test_the_defaults_a_user_reads_in_the_docs(redis_url: str) -> None:
    """No reason unless one is given; a cached result lives an hour; a miss says so."""
    assert fb.mark("default", 7)["reason"] == ""
    assert fb.CachedResult().ttl == 3600
    with pytest.raises(fb.NoFallback, match="^no cached result for these arguments$"):
        fb.CachedResult(ttl=60)(FakeTask(redis_url), ([9, 9, 9, 9],), {})


def test_cached_result_ttl_bounds() -> None:
    """Any positive number of seconds up to 30 days; nothing else."""
    assert fb.CachedResult(ttl=0.5).ttl == 0.5
    assert fb.CachedResult(ttl=30 * 24 * 3600).ttl == 30 * 24 * 3600
    for bad in (0, -1, 30 * 24 * 3600 + 1):
        with pytest.raises(ValueError, match="ttl must be a number of seconds above 0"):
            fb.CachedResult(ttl=bad)


def test_cached_result_key_ignores_keyword_order_and_takes_any_value(redis_url: str) -> None:
    """predict(a=1, b=2) and predict(b=2, a=1) share a result; odd values still make a key."""
    task = FakeTask(redis_url)
    cache = fb.CachedResult(ttl=60)
    cache.remember(task, (), {"a": 1, "b": 2}, "both")
    assert cache(task, (), {"b": 2, "a": 1}) == "both"
    odd = (datetime(2030, 1, 1, tzinfo=UTC),)
    cache.remember(task, odd, {}, "dated")
    assert cache(task, odd, {}) == "dated"


def test_cached_result_expires_after_its_ttl(redis_url: str) -> None:
    """The remembered result lives `ttl` seconds in Redis, no longer."""
    task = FakeTask(redis_url)
    cache = fb.CachedResult(ttl=60)
    cache.remember(task, (1,), {}, "one")
    assert 59_000 < task.cbtasks_redis.pttl(cache.key(task, (1,), {})) <= 60_000


def test_fallbacks_get_the_calls_own_arguments(redis_url: str) -> None:
    """Behind a cache, in a simpler model, a plain callable: the same args and kwargs."""
    task = FakeTask(redis_url)
    simpler = fb.SimplerModel(lambda x, y=0: x + y)
    assert fb.answer(simpler, task, (1,), {"y": 2}) == ("simpler_model", 3)
    cache = fb.CachedResult(ttl=60, otherwise=simpler)
    assert fb.answer(cache, task, (1,), {"y": 3}) == ("simpler_model", 4)
    plain = fb.as_fallback(lambda x, y=0: x * y)
    assert plain is not None and plain(task, (2,), {"y": 5}) == 10
    seen: list[Any] = []

    class Recording:
        kind = "recording"

        def __call__(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            seen.append((task, args, kwargs))
            return "noted"

    behind = fb.CachedResult(ttl=60, otherwise=Recording())
    assert fb.answer(behind, task, (9,), {"k": 1}) == ("recording", "noted")
    assert seen == [(task, (9,), {"k": 1})]
    assert fb.as_fallback(None) is None
    recording = Recording()
    assert fb.as_fallback(recording) is recording  # a fallback object is used as it is


def test_enqueue_for_later_sends_args_kwargs_and_countdown(redis_url: str) -> None:
    """The request goes as it came, after the countdown asked for."""
    task = FakeTask(redis_url)
    fb.EnqueueForLater("batch", countdown=30)(task, (1, 2), {"k": 3})
    assert task.sent == [((1, 2), {"k": 3}, {"queue": "batch", "countdown": 30})]
    fb.EnqueueForLater("batch")(task, (), {})
    assert task.sent[-1][2] == {"queue": "batch", "countdown": None}


def test_fallback_errors_say_what_to_pass(redis_url: str) -> None:
    """Messages that name the fix."""
    with pytest.raises(TypeError, match="SimplerModel needs a callable or a task"):
        fb.SimplerModel(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="EnqueueForLater needs the name of the queue"):
        fb.EnqueueForLater("")
    with pytest.raises(fb.NoFallback, match="no cached result for these arguments"):
        fb.CachedResult(ttl=60)(FakeTask(redis_url), (404,), {})


def test_a_fallback_of_your_own_has_the_hooks_a_cache_has(cbtasks: Any) -> None:
    """remember() hears every good result and answer() says which kind answered: looked
    up by name on any fallback, not only on CachedResult."""
    from celery import Celery

    from cbtasks import CircuitBreakerTask

    class LastSeen:
        """Remembers the last result per first argument, in the process."""

        kind = "last_seen"

        def __init__(self) -> None:
            self.seen: dict[Any, Any] = {}

        def remember(self, task: Any, args: tuple[Any, ...], kwargs: Any, result: Any) -> None:
            self.seen[args[0]] = result

        def answer(self, task: Any, args: tuple[Any, ...], kwargs: Any) -> tuple[str, Any]:
            if args[0] in self.seen:
                return self.kind, self.seen[args[0]]
            return "default", None

        def __call__(self, task: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
            return self.answer(task, args, kwargs)[1]

    app = Celery("hooks", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    last = LastSeen()

    @app.task(
        base=CircuitBreakerTask,
        name="hooks.predict",
        shared=False,
        breaker="hooks",
        on_open="fallback",
        fallback=last,
    )
    def predict(x: int) -> int:
        return x * 10

    cbtasks.use(app).memory()
    assert predict.delay(1).get() == 10
    assert last.seen == {1: 10}
    cbtasks.open("hooks")
    assert predict.delay(1).get() == fb.mark("last_seen", 10, predict.delay(1).get()["reason"])
    assert predict.delay(2).get()["cbtasks_fallback"] == "default"
    assert [f.kind for f in cbtasks.fallbacks][-1] == "default"


def test_a_cached_result_fills_in_eager_mode_too(cbtasks: Any) -> None:
    """An eager call that succeeds is remembered as a worker's run is (it was not: an
    eager test of a CachedResult fallback found the cache always empty)."""
    from celery import Celery

    from cbtasks import CircuitBreakerTask

    app = Celery("eager-cache", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True

    @app.task(
        base=CircuitBreakerTask,
        name="eager_cache.predict",
        shared=False,
        breaker="eager-cache",
        on_open="fallback",
        fallback=fb.CachedResult(ttl=60),
    )
    def predict(x: int) -> int:
        return x + 1

    cbtasks.use(app).memory()
    assert predict.delay(41).get() == 42
    cbtasks.open("eager-cache")
    answer = predict.delay(41).get()
    assert fb.is_fallback(answer) and answer["cbtasks_fallback"] == "cached"
    assert answer["result"] == 42
