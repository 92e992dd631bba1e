"""The fallbacks on their own: what each answers, and that answers are marked."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match="queue"):
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


def test_an_unreachable_cache_is_a_miss(redis_url: str) -> None:
    """Redis out of reach: the fallback behind the cache answers, nothing is raised."""
    task = FakeTask("redis://127.0.0.1:1/0")  # nothing listens on port 1
    backed = fb.CachedResult(ttl=60, otherwise=fb.DefaultPrediction("unknown"))
    assert backed(task, ([1, 2, 3, 4],), {}) == "unknown"


def test_the_mark_names_the_fallback_that_answered(redis_url: str) -> None:
    """A CachedResult with nothing cached answers with its `otherwise`: "default", not "cached"."""
    task = FakeTask(redis_url)
    cache = fb.CachedResult(ttl=60, otherwise=fb.DefaultPrediction(None))
    assert fb.answer(cache, task, ([1, 2, 3, 4],), {}) == ("default", None)
    cache.remember(task, ([1, 2, 3, 4],), {}, {"label": "setosa"})
    assert fb.answer(cache, task, ([1, 2, 3, 4],), {}) == ("cached", {"label": "setosa"})
