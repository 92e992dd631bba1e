"""The gateway's latency and throughput: circuit closed, open, and its Redis frozen.

    python -m bench.gateway [--requests 2000] [--concurrency 16] [--frozen-seconds 3]

Starts two Redis servers (the breaker state and results on one, the broker on
the other, so freezing the first leaves sending to the second), and the
gateway (``workers.gateway``) pinned to one core, with a probe that measures
its event loop's lag. No worker runs: every request asks ``wait=0``, so what
is timed is the gateway's own work (read the circuit, send the task, answer).
Load comes from this process, pinned to the other core.

Prints, per scenario, p50 and p99 latency, requests per second, and the
worst event-loop lag, with ratios against the closed circuit measured in the
same run. While the state's Redis is stopped (SIGSTOP), no request may wait
longer than the store's timeout and the loop may never stall that long.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench._timing import table
from cbtasks import CircuitBreaker, RedisStore
from cbtasks._testing.processes import Gateway
from cbtasks._testing.redis_server import RedisServer

FEATURES = [5.1, 3.5, 1.4, 0.2]
STORE_TIMEOUT = 0.25  # AsyncRedisStore's default


async def load(url: str, requests: int, concurrency: int) -> tuple[list[float], float, int]:
    """Latencies (s) of ``requests`` POSTs from ``concurrency`` clients, the wall time, errors."""
    latencies: list[float] = []
    errors = 0
    queue = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one_client() -> None:
            nonlocal errors
            for _ in queue:
                start = time.perf_counter()
                response = await client.post(
                    "/predict", params={"wait": 0}, json={"features": FEATURES}
                )
                latencies.append(time.perf_counter() - start)
                errors += response.status_code not in (200, 202)

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return latencies, time.perf_counter() - start, errors


def lag(url: str) -> float:
    """The gateway loop's worst lag (s) since the last ask, and start again."""
    return float(httpx.post(f"{url}/bench/lag", timeout=10).json()["worst_seconds"])


def measure(url: str, requests: int, concurrency: int) -> dict[str, float]:
    lag(url)
    latencies, wall, errors = asyncio.run(load(url, requests, concurrency))
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "p50": cuts[49],
        "p99": cuts[98],
        "max": max(latencies),
        "rps": len(latencies) / wall,
        "lag": lag(url),
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per scenario")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at once")
    parser.add_argument(
        "--frozen-requests", type=int, default=400, help="requests while Redis is frozen"
    )
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # the load on the second core; the gateway on the first
    with RedisServer() as state_redis, RedisServer() as broker_redis:
        env = {
            "CBTASKS_REDIS_URL": state_redis.url,
            "CBTASKS_BROKER_URL": broker_redis.url,
            "CBTASKS_RESULT_URL": state_redis.url,
            "CBTASKS_GATEWAY_FALLBACK": "default",
            "CBTASKS_BENCH_CPU": "0",
        }
        operator_store = RedisStore(state_redis.url)
        breaker = CircuitBreaker("iris-model", store=operator_store)
        results: dict[str, dict[str, float]] = {}
        serve = [sys.executable, "-m", "bench.gateway", "--serve"]
        with Gateway(
            env, command=serve, log_path=Path(os.environ.get("CBTASKS_BENCH_LOG", os.devnull))
        ) as gateway:
            measure(gateway.url, 200, args.concurrency)  # warm up
            results["closed"] = measure(gateway.url, args.requests, args.concurrency)
            breaker.force_open()
            time.sleep(0.2)  # the news reaches the gateway
            results["open (fallback)"] = measure(gateway.url, args.requests, args.concurrency)
            breaker.reset()
            time.sleep(0.2)
            state_redis.freeze()
            try:
                results["state Redis frozen"] = measure(
                    gateway.url, args.frozen_requests, args.concurrency
                )
            finally:
                state_redis.thaw()
        operator_store.close()
    print_results(results, args)
    return results


def print_results(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    base = results["closed"]
    rows = [("scenario", "p50 ms", "p99 ms", "max ms", "req/s (1 core)", "worst loop lag ms")]
    for name, r in results.items():
        rows.append(
            (
                name,
                f"{r['p50'] * 1000:.1f} ({r['p50'] / base['p50']:.2f}x)",
                f"{r['p99'] * 1000:.1f} ({r['p99'] / base['p99']:.2f}x)",
                f"{r['max'] * 1000:.0f}",
                f"{r['rps']:.0f} ({r['rps'] / base['rps']:.2f}x)",
                f"{r['lag'] * 1000:.1f}",
            )
        )
    print(table(rows))
    frozen = results["state Redis frozen"]
    print(
        f"\n{args.requests} requests per scenario ({args.frozen_requests} frozen), "
        f"{args.concurrency} clients, wait=0; errors: "
        + ", ".join(f"{name} {int(r['errors'])}" for name, r in results.items())
    )
    print(
        f"frozen: worst request {frozen['max'] * 1000:.0f} ms, worst loop lag "
        f"{frozen['lag'] * 1000:.1f} ms, against the store's timeout of "
        f"{STORE_TIMEOUT * 1000:.0f} ms"
    )


def serve() -> None:
    """The gateway with a loop-lag probe (``POST /bench/lag``), pinned to one core."""
    import uvicorn

    from workers.gateway import app

    cpu = os.environ.get("CBTASKS_BENCH_CPU")
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(cpu)})
    worst = 0.0

    async def probe() -> None:
        nonlocal worst
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - before - 0.005)

    @app.post("/bench/lag")
    async def read_lag() -> dict[str, Any]:
        nonlocal worst
        answer, worst = worst, 0.0
        return {"worst_seconds": answer}

    async def run(port: int) -> None:
        task = asyncio.create_task(probe())
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        await uvicorn.Server(config).serve()
        task.cancel()

    asyncio.run(run(int(sys.argv[2])))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve()
    else:
        main()
