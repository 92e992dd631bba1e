"""The breaker from asyncio: AsyncRedisStore on a real Redis, shared with blocking processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from cbtasks import (
    AsyncRedisStore,
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    EndpointFailure,
    MemoryStore,
    PolicyError,
    RedisStore,
    State,
)
from cbtasks._testing.redis_server import RedisServer

POLICY = BreakerPolicy(failure_threshold=2, open_seconds=0.5, half_open_probes=2)


async def fails() -> None:
    raise EndpointFailure("503 from the model", status=503)


async def answers(value: Any = "ok") -> Any:
    return value


class CommandCount:
    """Counts the commands an asyncio client sends."""

    def __init__(self, store: AsyncRedisStore) -> None:
        self.sent = 0
        original = store.client.execute_command

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.sent += 1
            return await original(*args, **kwargs)

        store.client.execute_command = counted  # type: ignore[method-assign]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, to freeze."""
    with RedisServer() as server:
        yield server


def test_acall_trips_rejects_locally_and_closes_after_probes(redis_url: str, name: str) -> None:
    async def scenario() -> None:
        store = AsyncRedisStore(redis_url)
        breaker = CircuitBreaker(name, policy=POLICY, store=store)
        assert await breaker.acall(answers, 1) == 1
        for _ in range(2):
            with pytest.raises(EndpointFailure):
                await breaker.acall(fails)
        count = CommandCount(store)
        with pytest.raises(CircuitOpenError) as rejected:
            await breaker.acall(answers)
        assert 0 < rejected.value.retry_after <= 0.5
        assert count.sent == 0  # known open: answered without a round trip
        await asyncio.sleep(0.55)
        assert await breaker.acall(answers, "probe") == "probe"
        assert await breaker.acall(answers, "probe") == "probe"
        status = await breaker.astatus()
        assert status is not None and status.state is State.CLOSED
        await store.aclose()

    asyncio.run(scenario())


def test_an_async_process_and_a_blocking_one_share_one_circuit(redis_url: str, name: str) -> None:
    """A worker (RedisStore) trips it; the asyncio process hears and rejects, and back."""
    worker_store = RedisStore(redis_url)
    worker = CircuitBreaker(name, policy=replace(POLICY, open_seconds=30), store=worker_store)

    async def scenario() -> None:
        store = AsyncRedisStore(redis_url)
        breaker = CircuitBreaker(name, policy=replace(POLICY, open_seconds=30), store=store)
        assert await breaker.acall(answers) == "ok"  # the view now says closed
        for _ in range(2):
            with pytest.raises(EndpointFailure):
                worker.call(lambda: (_ for _ in ()).throw(EndpointFailure("down")))
        deadline = time.monotonic() + 5
        while True:  # news reaches the async process's view
            try:
                await breaker.acall(answers)
            except CircuitOpenError:
                break
            assert time.monotonic() < deadline, "the async process never heard of the trip"
            await asyncio.sleep(0.01)
        worker.force_close()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert await breaker.acall(answers) == "ok"
                break
            except CircuitOpenError:
                assert time.monotonic() < deadline, "the async process never heard of the close"
                await asyncio.sleep(0.01)
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        worker_store.close()


def test_concurrent_tasks_in_half_open_get_only_the_probe_slots(redis_url: str, name: str) -> None:
    async def scenario() -> None:
        # A generous timeout: 30 connections opened at once on a loaded machine may
        # take longer than the default 0.25 s, and an outage would admit every call.
        store = AsyncRedisStore(redis_url, timeout=5)
        breaker = CircuitBreaker(name, policy=replace(POLICY, open_seconds=0.2), store=store)
        for _ in range(2):
            with pytest.raises(EndpointFailure):
                await breaker.acall(fails)
        await asyncio.sleep(0.25)
        release = asyncio.Event()
        started = 0

        async def slow_probe() -> str:
            nonlocal started
            started += 1
            await release.wait()
            return "ok"

        calls = [asyncio.create_task(breaker.acall(slow_probe)) for _ in range(30)]
        deadline = time.monotonic() + 10
        while started + sum(call.done() for call in calls) < len(calls):
            assert time.monotonic() < deadline, f"{started} started; the rest not all answered"
            await asyncio.sleep(0.01)
        release.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert started == 2
        assert sum(result == "ok" for result in results) == 2
        assert all(isinstance(r, CircuitOpenError) for r in results if r != "ok")
        status = await breaker.astatus()
        assert status is not None and status.state is State.CLOSED
        await store.aclose()

    asyncio.run(scenario())


def test_async_with_and_the_decorator_record_each_task_apart(redis_url: str, name: str) -> None:
    """Concurrent `async with` blocks each record their own outcome (a context per task)."""

    async def scenario() -> None:
        store = AsyncRedisStore(redis_url)
        breaker = CircuitBreaker(name, policy=replace(POLICY, failure_threshold=3), store=store)

        @breaker
        async def predict(x: int) -> int:
            await asyncio.sleep(0.01)
            return x * 2

        async def guarded(fail: bool) -> None:
            async with breaker:
                await asyncio.sleep(0.02)
                if fail:
                    raise EndpointFailure("down")

        assert await predict(4) == 8
        outcomes = await asyncio.gather(
            *(guarded(i % 2 == 0) for i in range(4)), return_exceptions=True
        )
        assert [isinstance(o, EndpointFailure) for o in outcomes] == [True, False, True, False]
        status = await breaker.astatus()
        assert status is not None and status.state is State.CLOSED, status
        assert await predict(1) == 2  # the count starts over
        for _ in range(3):
            with pytest.raises(EndpointFailure):
                await guarded(True)
        with pytest.raises(CircuitOpenError):
            await predict(1)
        await store.aclose()

    asyncio.run(scenario())


def test_a_memory_store_serves_both_forms(name: str) -> None:
    store = MemoryStore()
    breaker = CircuitBreaker(name, policy=POLICY, store=store, fallback=lambda: "fallback")
    for _ in range(2):
        with pytest.raises(EndpointFailure):
            asyncio.run(breaker.acall(fails))
    assert asyncio.run(breaker.acall(answers)) == "fallback"
    assert breaker.call(lambda: "sync") == "fallback"
    assert breaker.state is State.OPEN


def test_a_frozen_redis_never_stalls_the_event_loop(own_redis: RedisServer, name: str) -> None:
    """Redis stopped (SIGSTOP): guarded calls wait at most the store's timeout, the loop never.

    A loop blocked on the frozen socket would stall for the store's whole timeout
    (0.5 s); the bound sits below it, above what a busy 2-core machine's scheduler
    adds to a 5 ms sleep (up to 155 ms seen with the test modules run in parallel)."""

    async def scenario() -> tuple[float, float, list[Any]]:
        store = AsyncRedisStore(own_redis.url, timeout=0.5)
        breaker = CircuitBreaker(name, policy=POLICY, store=store)
        assert await breaker.acall(answers) == "ok"
        worst_lag = 0.0
        ticking = True

        async def ticker() -> None:
            nonlocal worst_lag
            while ticking:
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                worst_lag = max(worst_lag, time.perf_counter() - before - 0.005)

        tick = asyncio.create_task(ticker())
        own_redis.freeze()
        try:
            start = time.perf_counter()
            results = await asyncio.gather(
                *(breaker.acall(answers, i) for i in range(20)), return_exceptions=True
            )
            slowest = time.perf_counter() - start
        finally:
            own_redis.thaw()
            ticking = False
            await tick
        await store.aclose()
        return worst_lag, slowest, results

    worst_lag, slowest, results = asyncio.run(scenario())
    assert results == list(range(20))  # on_error="local": answered by the local breaker
    assert slowest < 1.5, f"the calls took {slowest:.2f}s with a 0.5 s store timeout"
    assert worst_lag < 0.4, f"the event loop stalled {worst_lag * 1000:.0f} ms"


def test_a_blocking_redis_store_is_called_off_the_loop(own_redis: RedisServer, name: str) -> None:
    """acall on a RedisStore runs its round trips in a thread: a freeze holds no loop (a
    blocked loop would stall the store's whole 0.5 s timeout; the bound is below it)."""
    store = RedisStore(own_redis.url, timeout=0.5)
    breaker = CircuitBreaker(name, policy=POLICY, store=store)
    breaker.call(lambda: None)
    store.news.forget_views()  # the next call asks Redis

    async def scenario() -> float:
        worst = 0.0
        own_redis.freeze()
        try:
            call = asyncio.create_task(breaker.acall(answers))
            while not call.done():
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                worst = max(worst, time.perf_counter() - before - 0.005)
            assert call.result() == "ok"
        finally:
            own_redis.thaw()
        return worst

    try:
        assert asyncio.run(scenario()) < 0.4
    finally:
        store.close()


def test_misuse_is_explained(redis_url: str, name: str) -> None:
    store = AsyncRedisStore(redis_url)
    breaker = CircuitBreaker(name, store=store)
    with pytest.raises(PolicyError, match="await breaker.acall"):
        breaker.call(lambda: None)
    with pytest.raises(PolicyError, match="await breaker.astatus"):
        breaker.status()
    with pytest.raises(PolicyError, match="health_check needs a blocking store"):
        CircuitBreaker(name, store=store, health_check=lambda: True)
    with pytest.raises(PolicyError, match="malformed Redis URL") as malformed:
        AsyncRedisStore("redis://:secret@localhost:notaport/0")
    assert "secret" not in str(malformed.value)
    with pytest.raises(PolicyError, match="redis.asyncio.Redis"):
        AsyncRedisStore(42)  # type: ignore[arg-type]
    asyncio.run(store.aclose())


def test_acircuit_reads_once_then_answers_an_open_circuit_locally(
    redis_url: str, name: str
) -> None:
    """What a gateway asks before each request: no round trip while the circuit is known open."""
    worker_store = RedisStore(redis_url)
    worker = CircuitBreaker(name, policy=replace(POLICY, open_seconds=30), store=worker_store)
    worker.force_open()

    async def scenario() -> None:
        store = AsyncRedisStore(redis_url)
        gateway = CircuitBreaker(name, policy=replace(POLICY, open_seconds=30), store=store)
        count = CommandCount(store)
        state, retry_after = await gateway.acircuit()
        assert state is State.OPEN and 0 < retry_after <= 30
        first_read = count.sent  # the status script (loaded first, once)
        assert first_read in (1, 2)
        for _ in range(100):
            assert (await gateway.acircuit())[0] is State.OPEN
        assert count.sent == first_read
        worker.disable()  # shadow mode admits every call: it reads as closed
        deadline = time.monotonic() + 5
        while (await gateway.acircuit())[0] is not State.CLOSED:
            assert time.monotonic() < deadline, "the gateway never heard of the change"
            await asyncio.sleep(0.01)
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        worker_store.close()


def test_a_blocking_admit_on_an_async_store_is_refused_even_while_known_closed(
    redis_url: str, name: str
) -> None:
    """admit() used to answer from the local view first: on an async store it succeeded
    while the circuit was known closed, and raised only once it was not."""

    async def scenario() -> None:
        store = AsyncRedisStore(redis_url)
        breaker = CircuitBreaker(name, policy=POLICY, store=store)
        try:
            assert await breaker.acall(answers) == "ok"
            assert breaker._view.closed  # this process knows it is closed
            with pytest.raises(PolicyError, match="await breaker.aadmit"):
                breaker.admit()
        finally:
            await store.aclose()

    asyncio.run(scenario())


# -- async generators: an LLM's answer streamed ----------------------------------------


async def _tokens(cut_after: int | None = None, count: int = 3) -> Any:
    """An endpoint's stream: ``count`` chunks, or ConnectionError after ``cut_after``."""
    for i in range(count):
        if cut_after is not None and i == cut_after:
            raise ConnectionError("the stream was cut off")
        yield f"token{i}"
        await asyncio.sleep(0)


@pytest.mark.parametrize("kind", ["memory", "async-redis"])
def test_an_async_generator_is_guarded(kind: str, redis_url: str, name: str) -> None:
    """@breaker on an async generator: streams cut off midway count, the circuit opens
    (fail_max=2), the third is refused without calling the endpoint."""

    async def scenario() -> None:
        store: Any = MemoryStore() if kind == "memory" else AsyncRedisStore(redis_url)
        breaker = CircuitBreaker(name, store=store, fail_max=2, reset_timeout=30)
        started: list[int] = []

        @breaker
        async def stream(cut_after: int) -> Any:
            started.append(cut_after)
            async for token in _tokens(cut_after):
                yield token

        for _ in range(2):
            got = []
            with pytest.raises(ConnectionError):
                async for token in stream(1):
                    got.append(token)
            assert got == ["token0"]
        with pytest.raises(CircuitOpenError):
            async for _ in stream(1):
                pass
        assert len(started) == 2
        assert (await breaker.acircuit())[0] is State.OPEN
        if kind == "async-redis":
            await store.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["memory", "async-redis"])
def test_an_async_stream_read_to_its_end_or_closed_early_is_a_success(
    kind: str, redis_url: str, name: str
) -> None:
    """breaker.astream(): a whole stream, and one whose consumer stops early, both succeed."""

    async def scenario() -> None:
        store: Any = MemoryStore() if kind == "memory" else AsyncRedisStore(redis_url)
        breaker = CircuitBreaker(name, store=store, fail_max=1, reset_timeout=30)
        assert [t async for t in breaker.astream(_tokens)] == ["token0", "token1", "token2"]
        early = breaker.astream(_tokens)
        assert await early.__anext__() == "token0"
        await early.aclose()  # the consumer stopped reading: the endpoint was answering
        assert (await breaker.acircuit())[0] is State.CLOSED
        failed = breaker.astream(_tokens, 0)
        with pytest.raises(ConnectionError):
            await failed.__anext__()
        assert (await breaker.acircuit())[0] is State.OPEN
        if kind == "async-redis":
            await store.aclose()

    asyncio.run(scenario())


def test_an_open_async_stream_yields_from_its_fallback() -> None:
    """The fallback may be an async generator too."""

    async def cached(*args: Any) -> Any:
        yield "cached"

    async def scenario() -> None:
        breaker = CircuitBreaker(fail_max=1, reset_timeout=30, fallback=cached)
        with pytest.raises(ConnectionError):
            async for _ in breaker.astream(_tokens, 0):
                pass
        assert [t async for t in breaker.astream(_tokens)] == ["cached"]

    asyncio.run(scenario())
