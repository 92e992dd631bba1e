"""The adaptive limit against a server of a capacity the clients do not know.

    python -m bench.adaptive [--rounds 3] [--variants ...] [--model]

The reference model server serves 4 calls at once (40 ms each), queues 4
more and answers TGI's 429 "Model is overloaded" beyond: its capacity is 100
calls a second and its uncongested latency 40 ms. 2 workers x 8 processes
take a backlog that never runs out (defer="pause": a request the limit refuses
waits in its process). 30 s after the first call the capacity halves (a
rolling deploy) and 15 s later it is restored. Side by side in one run, each
variant in turn in every round:

- breaker only: no limit; "overloaded" counts toward opening (5 in a row,
  open 2 s);
- static 8: ``Limit(concurrency=8)``, twice the server's capacity;
- static 4: ``Limit(concurrency=4)``, its capacity, right until it halves;
- adaptive: ``Limit(adaptive=True, min_concurrency=1, max_concurrency=64)``.

Measured at the server (each call's arrival, duration, status): goodput as a
fraction of the capacity, overload answers as a share of calls, p99 latency of
the answered calls as a multiple of 40 ms, in the steady 10-30 s, then right
after the halving (30-40 s), through it (35-45 s, against the halved capacity)
and 10-20 s after the restore (55-65 s); the times the circuit opened (from
the breaker's own news). Medians of the rounds.

``--model`` prints instead what the rule does on the simulated endpoint of
``cbtasks._testing.capacity_model`` (no processes, a minute in a second) for a
grid of its constants: the figures behind the choice of GROWTH and the
default latency_tolerance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from bench._timing import table
from cbtasks import Limit
from cbtasks import _limiter as rule
from cbtasks._testing.capacity_model import simulate
from cbtasks._testing.processes import CeleryWorker, ModelServer, client_app
from cbtasks._testing.redis_server import RedisServer

FEATURES = [5.1, 3.5, 1.4, 0.2]
QUEUE = "bench-limited"
SERVICE_MS = 40.0
CAPACITY, QUEUED = 4, 4
HALVED_AT, RESTORED_AT, END = 30.0, 45.0, 65.0
VARIANTS: dict[str, dict[str, Any] | None] = {
    "breaker only": None,
    "static 8 (twice too high)": {"concurrency": 8},
    "static 4 (right)": {"concurrency": 4},
    "adaptive": {"adaptive": True, "min_concurrency": 1, "max_concurrency": 64},
}
COLUMNS = (
    "goodput 10-30s",
    "overload 10-30s",
    "p99 10-30s",
    "overload 30-40s",
    "goodput 35-45s (halved)",
    "goodput 55-65s",
    "circuit opened",
    "limit 10-30s",
)


def run_variant(name: str, limit: dict[str, Any] | None, logs: Path) -> dict[str, float]:
    """One run of a variant on a stack of its own; its figures by COLUMNS."""
    with RedisServer() as server, ModelServer() as model:
        env = {"CBTASKS_REDIS_URL": server.url, "CBTASKS_MODEL_URL": model.url}
        if limit is not None:
            env["CBTASKS_BENCH_LIMIT"] = json.dumps(limit)
        workers = [
            CeleryWorker(
                env,
                concurrency=8,
                queues=f"celery,{QUEUE}",
                name=f"adaptive{i}",
                log_path=logs / f"{name.split()[0]}-{i}.log",
                app="bench.baselines",
                prefetch_multiplier=1,
            ).start()
            for i in range(2)
        ]
        try:
            app = client_app(server.url, "bench-adaptive")
            for result in [app.send_task("workers.predict", (FEATURES,)) for _ in range(32)]:
                result.get(timeout=120)  # every process warm, no capacity yet
            model.capacity(concurrency=CAPACITY, queue=QUEUED, service_ms=SERVICE_MS)
            model.reset_stats()
            opened = _count_opens(server.url)
            limits: list[tuple[float, float]] = []
            backlog = int(END * CAPACITY * 1000 / SERVICE_MS * 1.3)
            for _ in range(backlog):
                app.send_task("bench.limited_paused", (FEATURES,), queue=QUEUE)
            start = _first_arrival(model)
            _timeline(model, start, limits, server.url)
            calls = model.calls()
        finally:
            for worker in workers:
                worker.stop()
            opened_count = opened()
    return _figures(calls, start, limits, opened_count)


def _first_arrival(model: ModelServer) -> float:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        arrived = model.arrivals()
        if arrived:
            return arrived[0]
        time.sleep(0.05)
    raise RuntimeError("no call reached the server")


def _timeline(
    model: ModelServer, start: float, limits: list[tuple[float, float]], url: str
) -> None:
    """Halve the capacity at HALVED_AT, restore it at RESTORED_AT, stop at END; sample the
    adaptive limit meanwhile."""
    from cbtasks import CircuitBreaker, RedisStore

    store = RedisStore(url)
    breaker = CircuitBreaker(QUEUE, store=store)
    halved = restored = False
    try:
        while (now := time.time()) < start + END:
            if not halved and now >= start + HALVED_AT:
                model.capacity(concurrency=CAPACITY // 2, queue=QUEUED, service_ms=SERVICE_MS)
                halved = True
            if not restored and now >= start + RESTORED_AT:
                model.capacity(concurrency=CAPACITY, queue=QUEUED, service_ms=SERVICE_MS)
                restored = True
            status = breaker.status()
            if status is not None and status.limit is not None and status.limit.concurrency:
                limits.append((now - start, status.limit.concurrency))
            time.sleep(0.25)
    finally:
        store.close()


def _count_opens(url: str) -> Any:
    """Count the breaker's trips from its own news, in a thread; returns the reader."""
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("cbtasks:news")
    opens: list[int] = []
    last_version = [-1]
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message is None:
                continue
            name, version, state, *_ = message["data"].decode().split("\n")
            if name == QUEUE and state == "1" and int(version) > last_version[0]:
                opens.append(int(version))
            last_version[0] = max(last_version[0], int(version))

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()

    def read() -> int:
        stop.set()
        thread.join(2)
        pubsub.close()
        client.close()
        return len(opens)

    return read


def _figures(
    calls: list[tuple[float, float, int]],
    start: float,
    limits: list[tuple[float, float]],
    opened: int,
) -> dict[str, float]:
    capacity_per_s = CAPACITY * 1000 / SERVICE_MS

    def window(a: float, b: float) -> list[tuple[float, float, int]]:
        return [c for c in calls if start + a <= c[0] < start + b]

    def goodput(a: float, b: float, capacity: float) -> float:
        return sum(1 for c in window(a, b) if c[2] == 200) / (b - a) / capacity

    def overload(a: float, b: float) -> float:
        seen = window(a, b)
        return sum(1 for c in seen if c[2] == 429) / max(1, len(seen))

    answered = sorted(c[1] for c in window(10, 30) if c[2] == 200)
    p99 = answered[max(0, int(len(answered) * 0.99) - 1)] if answered else 0.0
    steady_limits = [v for t, v in limits if 10 <= t < 30]
    return {
        "goodput 10-30s": goodput(10, 30, capacity_per_s),
        "overload 10-30s": overload(10, 30),
        "p99 10-30s": p99 * 1000 / SERVICE_MS,
        "overload 30-40s": overload(30, 40),
        "goodput 35-45s (halved)": goodput(35, 45, capacity_per_s / 2),
        "goodput 55-65s": goodput(55, 65, capacity_per_s),
        "circuit opened": float(opened),
        "limit 10-30s": statistics.mean(steady_limits) if steady_limits else 0.0,
    }


def _shown(column: str, value: float) -> str:
    if column.startswith("overload"):
        return f"{value:.1%}"
    if column.startswith("p99"):
        return f"{value:.2f}x"
    if column == "circuit opened":
        return f"{value:.0f}"
    if column.startswith("limit"):
        return f"{value:.1f}" if value else "-"
    return f"{value:.2f}"


def model_grid() -> None:
    """The rule on the simulated endpoint for a grid of its constants."""
    rows = [
        (
            "GROWTH",
            "tolerance",
            "goodput 10-30s",
            "overload 10-30s",
            "p99 10-30s",
            "goodput halved",
            "overload halved",
            "goodput restored",
        )
    ]
    default_growth = rule.GROWTH
    try:
        for growth in (0.1, 0.2, 0.5, 1.0):
            for tolerance in (1.25, 1.5, 2.0):
                rule.GROWTH = growth
                limit = Limit(
                    adaptive=True,
                    min_concurrency=1,
                    max_concurrency=64,
                    latency_tolerance=tolerance,
                )
                run = simulate(limit, seconds=END, changes=[(HALVED_AT, 2), (RESTORED_AT, 4)])
                steady = run.window(10, 30, capacity=4)
                halved = run.window(35, 45, capacity=2)
                hit = run.window(30, 40, capacity=2)
                restored = run.window(55, 65, capacity=4)
                rows.append(
                    (
                        f"{growth:g}",
                        f"{tolerance:g}",
                        f"{steady['goodput']:.2f}",
                        f"{steady['overload']:.1%}",
                        f"{steady['p99']:.2f}x",
                        f"{halved['goodput']:.2f}",
                        f"{hit['overload']:.1%}",
                        f"{restored['goodput']:.2f}",
                    )
                )
    finally:
        rule.GROWTH = default_growth
    print(
        "### the rule on a simulated endpoint (capacity 4, queue 4, 40 ms, 16 callers; "
        "halved at 30 s, restored at 45 s)\n"
    )
    print(table(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--model", action="store_true", help="the simulated endpoint only")
    args = parser.parse_args(argv)
    if args.model:
        model_grid()
        return
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds is 1 to 10")
    logs = Path(tempfile.mkdtemp(prefix="cbtasks-bench-adaptive-"))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    for _ in range(args.rounds):
        for name in chosen:
            runs[name].append(run_variant(name, VARIANTS[name], logs))
    rows = [("variant", *COLUMNS)]
    for name, results in runs.items():
        rows.append(
            (
                name,
                *(_shown(c, statistics.median(r[c] for r in results)) for c in COLUMNS),
            )
        )
    print(
        f"### adaptive: medians of {args.rounds} round(s); capacity {CAPACITY} x "
        f"{SERVICE_MS:.0f} ms, queue {QUEUED}, TGI's 429 beyond; halved at {HALVED_AT:.0f} s, "
        f"restored at {RESTORED_AT:.0f} s; 2 workers x 8 processes, defer='pause'; logs in {logs}\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
