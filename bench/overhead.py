"""Cost of a guarded call: cbtasks against a bare call, Redis round trips and pybreaker.

    python -m bench.overhead [--calls N] [--rounds R]

Prints median microseconds per call and the ratios the breaker core promises:
RedisStore healthy call <= 1.15 x a trivial EVALSHA and <= 0.5 x pybreaker's
Redis storage; MemoryStore call <= 0.75 x pybreaker in memory; a rejection
while open <= a MemoryStore guarded call.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import pybreaker
import redis

from bench._timing import median_ratio, per_call_samples, table
from cbtasks import CircuitBreaker, CircuitOpenError, MemoryStore, RedisStore
from cbtasks._testing.redis_server import RedisServer

TRIVIAL_SCRIPT = "return redis.call('HGET', KEYS[1], 'f')"


def noop() -> int:
    return 1


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (Redis variants)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    args = parser.parse_args(argv)

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.hset("bench:h", "f", "1")
        sha = client.script_load(TRIVIAL_SCRIPT)

        memory = CircuitBreaker("bench-memory", fail_max=5, reset_timeout=10, store=MemoryStore())
        shared = CircuitBreaker(
            "bench-redis", fail_max=5, reset_timeout=10, store=RedisStore(server.url)
        )
        pb_memory = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=10)
        pb_redis = pybreaker.CircuitBreaker(
            fail_max=5,
            reset_timeout=10,
            state_storage=pybreaker.CircuitRedisStorage(
                pybreaker.STATE_CLOSED, redis.Redis.from_url(server.url), namespace="bench-pb"
            ),
        )
        open_memory = CircuitBreaker("open-memory", store=MemoryStore())
        open_memory.force_open()
        open_redis = CircuitBreaker("open-redis", store=RedisStore(server.url))
        open_redis.force_open()

        guarded_memory = memory(noop)
        guarded_redis = shared(noop)
        pb_memory_call = pb_memory(noop)
        pb_redis_call = pb_redis(noop)

        def reject(breaker: CircuitBreaker) -> None:
            try:  # noqa: SIM105 - try/except is the cheapest form, as callers write it
                breaker.call(noop)
            except CircuitOpenError:
                pass

        for warm in (guarded_memory, guarded_redis, pb_memory_call, pb_redis_call):
            warm()
        reject(open_redis)

        fast = per_call_samples(
            {
                "bare call": noop,
                "cbtasks MemoryStore": guarded_memory,
                "pybreaker memory": pb_memory_call,
                "cbtasks rejection, MemoryStore": functools.partial(reject, open_memory),
                "cbtasks rejection, RedisStore": functools.partial(reject, open_redis),
            },
            calls=args.calls * 25,
            rounds=args.rounds,
        )
        slow = per_call_samples(
            {
                "Redis PING": client.ping,
                "trivial EVALSHA": lambda: client.execute_command("EVALSHA", sha, 1, "bench:h"),
                "cbtasks RedisStore": guarded_redis,
                "pybreaker Redis storage": pb_redis_call,
            },
            calls=args.calls,
            rounds=args.rounds,
        )
        for breaker in (shared, open_redis):
            breaker.store.close()  # type: ignore[attr-defined]
    samples = {**fast, **slow}
    rows = [("variant", "median us/call")]
    rows += [(name, f"{statistics.median(v) * 1e6:.2f}") for name, v in samples.items()]
    print(table(rows))
    checks = [
        ("RedisStore / trivial EVALSHA", "cbtasks RedisStore", "trivial EVALSHA", 1.15),
        ("RedisStore / pybreaker Redis", "cbtasks RedisStore", "pybreaker Redis storage", 0.5),
        ("MemoryStore / pybreaker memory", "cbtasks MemoryStore", "pybreaker memory", 0.75),
        (
            "rejection (memory) / MemoryStore call",
            "cbtasks rejection, MemoryStore",
            "cbtasks MemoryStore",
            1.0,
        ),
        (
            "rejection (redis) / MemoryStore call",
            "cbtasks rejection, RedisStore",
            "cbtasks MemoryStore",
            1.0,
        ),
    ]
    ratios = {label: median_ratio(samples, top, bottom) for label, top, bottom, _ in checks}
    verdicts = [
        (label, f"{ratios[label]:.2f}", f"<= {goal:g}", "ok" if ratios[label] <= goal else "MISSED")
        for label, _, _, goal in checks
    ]
    print()
    print(table([("ratio (median over rounds)", "value", "goal", ""), *verdicts]))
    return ratios


if __name__ == "__main__":
    main()
