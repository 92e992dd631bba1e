"""How many guarded calls one Redis, and a 3-master cluster, can serve: measured and projected.

    python -m bench.ceiling [--clients 4] [--seconds 4] [--rounds 3] [--breakers 64]

Client processes make healthy guarded calls as fast as they can, over one
breaker or spread over many, against one Redis and against a cluster of
three masters. On a small machine the clients run out of CPU before Redis
does, so besides the calls per second it measures what each call costs Redis
(its own CPU seconds, from ``INFO cpu``, on the busiest node) and projects
the ceiling: the calls per second at which that node's one core is full.
The variants take turns in every round; medians over rounds are printed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from dataclasses import dataclass

import redis

from bench._timing import table
from cbtasks import CircuitBreaker, RedisStore
from cbtasks._testing.redis_cluster import RedisClusterServers
from cbtasks._testing.redis_server import RedisServer


@dataclass(frozen=True)
class Variant:
    label: str
    url: str
    ports: list[int]
    breakers: int


def _client(
    url: str, breakers: int, start: float, seconds: float, out: multiprocessing.Queue
) -> None:  # type: ignore[type-arg]
    store = RedisStore(url)
    guarded = [CircuitBreaker(f"ceiling-{i}", store=store) for i in range(breakers)]
    for breaker in guarded:
        breaker.call(lambda: None)  # connect, load the scripts, learn the state
    while time.time() < start:
        time.sleep(0.001)
    calls, end = 0, start + seconds
    while time.time() < end:
        for breaker in guarded:
            breaker.call(lambda: None)
        calls += len(guarded)
    out.put(calls)
    store.close()


def _redis_cpu(ports: list[int]) -> list[float]:
    """CPU seconds (user + system) each server has used so far."""
    seconds = []
    for port in ports:
        client = redis.Redis(port=port)
        info = client.info("cpu")
        seconds.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
        client.close()
    return seconds


@dataclass(frozen=True)
class Run:
    calls_per_second: float
    #: CPU cores used by the busiest server, and by all servers together.
    busiest_cores: float
    total_cores: float

    @property
    def ceiling(self) -> float:
        """Calls/s at which the busiest server's one core would be full."""
        return self.calls_per_second / self.busiest_cores

    @property
    def us_per_call(self) -> float:
        """Redis CPU time per guarded call, all servers together."""
        return self.total_cores / self.calls_per_second * 1e6


def idle_cores(ports: list[int], seconds: float = 2.0) -> list[float]:
    """What each server uses with no client (its timers, a cluster's bus): subtracted."""
    before = _redis_cpu(ports)
    time.sleep(seconds)
    return [(b - a) / seconds for a, b in zip(before, _redis_cpu(ports), strict=True)]


def measure(variant: Variant, clients: int, seconds: float, idle: list[float]) -> Run:
    """Guarded calls per second and the CPU the servers spent on them, over one run."""
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    start = time.time() + 3.0
    procs = [
        ctx.Process(target=_client, args=(variant.url, variant.breakers, start, seconds, out))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    while time.time() < start:
        time.sleep(0.01)
    before = _redis_cpu(variant.ports)
    calls = sum(out.get(timeout=seconds + 60) for _ in procs)
    after = _redis_cpu(variant.ports)
    for proc in procs:
        proc.join()
    used = [
        max(1e-6, (b - a) / seconds - base) for a, b, base in zip(before, after, idle, strict=True)
    ]
    return Run(calls / seconds, max(used), sum(used))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--breakers", type=int, default=64, help="breakers in the spread runs")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.rounds < 1 or args.breakers < 1:
        parser.error("--clients, --seconds, --rounds and --breakers must be positive")
    with RedisServer() as one, RedisClusterServers() as cluster:
        cluster_ports = [node.port for node in cluster.nodes]
        variants = [
            Variant("one Redis, 1 breaker", one.url, [one.port], 1),
            Variant(f"one Redis, {args.breakers} breakers", one.url, [one.port], args.breakers),
            Variant("cluster of 3, 1 (hot) breaker", cluster.url, cluster_ports, 1),
            Variant(
                f"cluster of 3, {args.breakers} breakers",
                cluster.url,
                cluster_ports,
                args.breakers,
            ),
        ]
        idle = {one.port: idle_cores([one.port])[0]}
        idle.update(zip(cluster_ports, idle_cores(cluster_ports), strict=True))
        runs: dict[str, list[Run]] = {v.label: [] for v in variants}
        for _ in range(args.rounds):
            for variant in variants:
                runs[variant.label].append(
                    measure(variant, args.clients, args.seconds, [idle[p] for p in variant.ports])
                )
    rows = [("variant", "calls/s", "busiest Redis (cores)", "Redis us/call", "projected ceiling")]
    for variant in variants:
        done = runs[variant.label]
        rows.append(
            (
                variant.label,
                f"{statistics.median(r.calls_per_second for r in done):,.0f}",
                f"{statistics.median(r.busiest_cores for r in done):.2f}",
                f"{statistics.median(r.us_per_call for r in done):.1f}",
                f"{statistics.median(r.ceiling for r in done):,.0f} calls/s",
            )
        )
    print(table(rows))
    print(
        f"\n{args.clients} client processes, {args.seconds:g} s runs, medians of {args.rounds} "
        "rounds.\nRedis us/call: the CPU time of all servers per guarded call, their idle use "
        "subtracted.\nProjected ceiling: the calls/s at which the busiest server's one core "
        "would be full.\nA fleet of K processes at R healthy calls/s sends K x R commands/s "
        "(bench/scale.py):\nit needs K x R well below the ceiling (Celery's own commands share "
        "the server when\nthe broker is the same Redis)."
    )


if __name__ == "__main__":
    main()
