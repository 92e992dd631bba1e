"""Redis commands per second that a fleet's breakers cost: measured at small K, and the formula.

    python -m bench.scale [--rate 50] [--seconds 4]

K processes each make R healthy guarded calls per second for a few seconds;
MONITOR counts the commands their breakers send to Redis (scripts count as
one). The formula K x R x c (c: commands per call) then gives any fleet size.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import pybreaker
import redis

from bench._timing import table
from bench.redis_cost import CommandCounter
from cbtasks import CircuitBreaker, RedisStore
from cbtasks._testing.redis_server import RedisServer


def _calls(url: str, variant: str, rate: float, seconds: float, start: float) -> None:
    if variant == "cbtasks":
        breaker = CircuitBreaker("scale", store=RedisStore(url))
        call = breaker.call
    else:
        pb = pybreaker.CircuitBreaker(
            state_storage=pybreaker.CircuitRedisStorage(
                pybreaker.STATE_CLOSED, redis.Redis.from_url(url), namespace="scale"
            )
        )
        call = pb.call
    call(lambda: None)  # connect and learn the state before counting starts
    while time.time() < start:
        time.sleep(0.001)
    for i in range(int(rate * seconds)):
        due = start + i / rate
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        call(lambda: None)


def measure(url: str, variant: str, workers: int, rate: float, seconds: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 3.0
    procs = [
        ctx.Process(target=_calls, args=(url, variant, rate, seconds, start))
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    while time.time() < start - 0.5:
        time.sleep(0.05)
    with CommandCounter(url).counting() as commands:
        for proc in procs:
            proc.join()
    return len(commands) / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="calls per second per process")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    rows = [("variant", "K", "R/s", "measured cmd/s", "K x R x c", "c")]
    with RedisServer() as server:
        for variant, per_call in (("cbtasks", 1), ("pybreaker", 2)):
            for workers in (1, 2, 4):
                measured = measure(server.url, variant, workers, args.rate, args.seconds)
                formula = workers * args.rate * per_call
                rows.append(
                    (
                        variant,
                        str(workers),
                        f"{args.rate:g}",
                        f"{measured:.0f}",
                        f"{formula:.0f}",
                        str(per_call),
                    )
                )
    print(table(rows))
    print(
        "\nA fleet of K processes at R calls/s costs Redis K x R x c commands/s for its breakers:"
        "\ncbtasks c = 1 (one EVALSHA per healthy call, 0 per rejection while open);"
        "\npybreaker's Redis storage c = 2 (a GET and a SET); plain Celery autoretry has no breaker"
        "\n(c = 0) but keeps calling the endpoint through an outage (bench/outage.py)."
    )


if __name__ == "__main__":
    main()
