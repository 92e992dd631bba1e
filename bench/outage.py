"""An outage storm: cbtasks (countdown and park) against plain Celery autoretry.

    python -m bench.outage [--tasks 500] [--rate 0] [--outage 20] [--open-seconds 2]
                           [--latency-ms 20] [--backlog 10000] [--idle 30]

Each variant gets its own Redis, the reference model server and a worker of
4 processes. N tasks are sent; when a fifth are done the endpoint goes down
for --outage seconds. Printed per variant: endpoint calls during the outage,
peak endpoint concurrency after recovery, seconds from recovery to the last
task done, Redis commands per task (INFO commandstats, which also counts
what scripts run inside), peak worker memory, tasks lost and duplicate
executions. With --backlog, a second table: that many requests parked (or
held) during a forced-open circuit, the workers' memory growth, and whether
each ran exactly once after recovery. With --rate, tasks are sent at that many
a second instead of all at once. With --idle, a worker with a park-mode task
idles that long and the Redis commands it sends are counted by kind.
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

from bench._memory import MemoryWatch
from bench._timing import table
from cbtasks import CircuitBreaker, RedisStore
from cbtasks._testing.processes import CeleryWorker, ModelServer, client_app
from cbtasks._testing.redis_server import RedisServer

FEATURES = [5.1, 3.5, 1.4, 0.2]
_TIME = "recovery to last done (s)"
VARIANTS = {
    "cbtasks countdown": "workers.predict",
    "cbtasks park": "workers.predict_parked",
    "cbtasks pause": "workers.predict_paused",
    "celery autoretry": "workers.predict_autoretry",
    "pybreaker redis + retry": "workers.predict_pybreaker_redis",
    "pybreaker memory + retry": "workers.predict_pybreaker_memory",
}


#: Each pool's concurrency, as fleets run model calls on it (--pool); --concurrency overrides.
POOL_CONCURRENCY = {"prefork": 4, "threads": 16, "gevent": 64, "eventlet": 64, "solo": 1}
#: The pool and concurrency of this invocation's workers (set by main()).
_POOL: dict[str, Any] = {"pool": "prefork", "concurrency": 4}


def _stack(
    logs: Path, name: str, open_seconds: float = 2.0
) -> tuple[RedisServer, ModelServer, CeleryWorker, Any]:
    server = RedisServer().start()
    model = ModelServer().start()
    env = {
        "CBTASKS_REDIS_URL": server.url,
        "CBTASKS_MODEL_URL": model.url,
        "CBTASKS_BENCH_OPEN_SECONDS": str(open_seconds),
    }
    # A client app of its own per run: Celery caches its connections per app.
    client = client_app(server.url, f"bench-{name}")
    worker = CeleryWorker(
        env,
        concurrency=_POOL["concurrency"],
        pool=_POOL["pool"],
        queues="celery,iris-model",  # iris-model: the pause variant's own queue
        log_path=logs / f"{name}-{_POOL['pool']}.log",
        app="bench.baselines",
    ).start()
    return server, model, worker, client


#: The queue each task is sent to (a client app has no routes): pause needs its own.
QUEUES = {"workers.predict_paused": "iris-model"}


def _send(app: Any, task_name: str, tasks: int, rate: float) -> list[Any]:
    """``tasks`` tasks, all at once (rate 0) or ``rate`` a second, from a thread."""
    results: list[Any] = []
    queue = QUEUES.get(task_name, "celery")
    start = time.monotonic()
    for i in range(tasks):
        if rate:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
        results.append(app.send_task(task_name, (FEATURES,), queue=queue))
    return results


def _done_times(client: Any, results: list[Any]) -> list[float]:
    """When each task was done (epoch seconds), from the result backend's date_done."""
    from datetime import datetime

    times = []
    for result in results:
        raw = client.get(f"celery-task-meta-{result.id}")
        if raw:
            done = json.loads(raw).get("date_done")
            if done:
                times.append(datetime.fromisoformat(done).timestamp())
    return sorted(times)


def _rate(times: list[float]) -> float:
    """Tasks done per second over the span in which ``times`` fell."""
    if len(times) < 2:
        return 0.0
    return (len(times) - 1) / max(times[-1] - times[0], 1e-3)


def healthy_run(task_name: str, tasks: int, latency_ms: float, logs: Path) -> tuple[float, float]:
    """The same workers on a healthy backlog of ``tasks``: tasks done per second, and the
    Redis commands per task."""
    server, model, worker, app = _stack(logs, f"healthy-{task_name}")
    try:
        client = redis.Redis.from_url(server.url)
        queue = QUEUES.get(task_name, "celery")
        app.send_task(task_name, (FEATURES,), queue=queue).get(timeout=60)
        model.faults(latency_ms=latency_ms)
        client.config_resetstat()
        results = _send(app, task_name, tasks, 0.0)
        for result in results:
            result.get(timeout=600)
        commands = sum(v["calls"] for v in client.info("commandstats").values())
        return _rate(_done_times(client, results)), commands / tasks
    finally:
        worker.stop()
        model.stop()
        server.stop()


def outage_run(
    task_name: str,
    tasks: int,
    outage: float,
    latency_ms: float,
    logs: Path,
    rate: float = 0.0,
    open_seconds: float = 2.0,
) -> dict[str, Any]:
    server, model, worker, app = _stack(logs, task_name, open_seconds)
    try:
        client = redis.Redis.from_url(server.url)
        queue = QUEUES.get(task_name, "celery")
        app.send_task(task_name, (FEATURES,), queue=queue).get(timeout=60)  # the worker is up
        model.faults(latency_ms=latency_ms)
        model.reset_stats()
        client.config_resetstat()
        assert worker.process is not None
        memory = MemoryWatch(worker.process.pid).start()
        results: list[Any] = []
        sender = threading.Thread(
            target=lambda: results.extend(_send(app, task_name, tasks, rate)), daemon=True
        )
        sender.start()
        # With a rate, the outage starts a fifth of the way into the sending.
        time.sleep(tasks / rate / 5 if rate else 0)
        if not rate:
            sender.join()
            while sum(r.ready() for r in results) < tasks // 5:
                time.sleep(0.05)
        model.phase("outage")
        model.faults(latency_ms=latency_ms, outage_seconds=outage)
        while model.stats()["down"]:
            time.sleep(0.05)
        recovered = time.monotonic()
        recovered_at = time.time()
        model.phase("recovery")
        sender.join()
        lost = 0
        for result in results:
            try:
                result.get(timeout=outage * 10 + 300)
            except Exception:
                lost += 1
        done = time.monotonic()
        memory.stop()
        stats = model.stats()
        commandstats = client.info("commandstats")
        commands = sum(v["calls"] for v in commandstats.values())

        # The drain: tasks done after the endpoint came back, per second, over
        # the span from the first of them to the last.
        drained = [t for t in _done_times(client, results) if t >= recovered_at]

        def per_task(command: str) -> float:
            return round(commandstats.get(f"cmdstat_{command}", {}).get("calls", 0) / tasks, 1)

        return {
            "endpoint calls in outage": stats["phases"].get("outage", {}).get("requests", 0),
            "peak concurrency after": stats["phases"].get("recovery", {}).get("peak_in_flight", 0),
            "recovery to last done (s)": round(done - recovered, 1),
            "drain rate (tasks/s)": round(_rate(drained)),
            "Redis commands per task": round(commands / tasks, 1),
            # What clients send, by who sends it (a script's own commands are
            # counted in the total too): cbtasks' scripts (breaker, parking),
            # the completion guard's GET and SET, and Celery's broker messages.
            "scripts (EVALSHA)": per_task("evalsha"),
            "GET+SET (guard, results)": round(per_task("get") + per_task("set"), 1),
            "broker messages (LPUSH)": per_task("lpush"),
            "worker peak RSS (MB)": round(memory.peak / 2**20),
            "worst process growth (MB)": round(memory.worst_growth / 2**20, 1),
            "lost": lost,
            "duplicates": stats["calls_after_success"],
        }
    finally:
        worker.stop()
        model.stop()
        server.stop()


def backlog_run(task_name: str, tasks: int, logs: Path) -> dict[str, Any]:
    """``tasks`` requests sent while the circuit is forced open, then released."""
    server, model, worker, app = _stack(logs, f"backlog-{task_name}")
    store = RedisStore(server.url)
    try:
        breaker = CircuitBreaker("iris-model", store=store)
        # Warm every pool process (imports, connections) before the baseline.
        warm = [app.send_task(task_name, (FEATURES,)) for _ in range(40)]
        for result in warm:
            result.get(timeout=60)
        model.reset_stats()
        assert worker.process is not None
        memory = MemoryWatch(worker.process.pid).start()
        breaker.force_open()
        results = [app.send_task(task_name, (FEATURES,)) for _ in range(tasks)]
        time.sleep(10)  # a bench, not a test: let the backlog settle where the variant keeps it
        held = memory.worst_growth
        breaker.force_close()
        ok = sum(1 for r in results if r.get(timeout=900))
        memory.stop()
        stats = model.stats()
        return {
            "worst process growth while held (MB)": round(held / 2**20, 1),
            "worst process growth, whole run (MB)": round(memory.worst_growth / 2**20, 1),
            "ran": ok,
            "endpoint calls": stats["requests"],
            "duplicates": stats["calls_after_success"],
        }
    finally:
        store.close()
        worker.stop()
        model.stop()
        server.stop()


def idle_run(seconds: float, logs: Path) -> None:
    """A worker with a park-mode task, idle: the Redis commands it sends, by kind."""
    server, model, worker, app = _stack(logs, "idle")
    try:
        app.send_task("workers.predict_parked", (FEATURES,)).get(timeout=60)
        time.sleep(2)  # the releaser has gone to sleep
        client = redis.Redis.from_url(server.url)
        client.config_resetstat()
        time.sleep(seconds)
        stats = client.info("commandstats")
        rows = [("command", "calls", "per second")]
        for key, value in sorted(stats.items()):
            command = key.removeprefix("cmdstat_")
            if command in ("config|resetstat", "info"):
                continue
            rows.append((command, str(value["calls"]), f"{value['calls'] / seconds:.2f}"))
        print(f"\nan idle worker (4 processes, one park-mode task) for {seconds:g} s\n")
        print(table(rows))
    finally:
        worker.stop()
        model.stop()
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--rate", type=float, default=0.0, help="tasks sent a second (0: at once)")
    parser.add_argument("--open-seconds", type=float, default=2.0, help="the breaker's open period")
    parser.add_argument(
        "--idle", type=float, default=0.0, help="seconds of an idle worker (0: skip)"
    )
    parser.add_argument("--outage", type=float, default=20.0, help="seconds")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="endpoint latency")
    parser.add_argument("--backlog", type=int, default=0, help="parked backlog size (0: skip)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (medians)")
    parser.add_argument(
        "--pool",
        default="prefork",
        help="worker pools, comma-separated (prefork, threads, gevent, eventlet, solo): "
        "each variant runs on each",
    )
    parser.add_argument(
        "--concurrency", type=int, default=0, help="the worker's concurrency (0: the pool's own)"
    )
    parser.add_argument(
        "--healthy",
        type=int,
        default=0,
        help="also a healthy backlog of this many tasks per variant: the workers' own pace",
    )
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    pools = [p.strip() for p in args.pool.split(",") if p.strip()]
    if not pools or any(p not in POOL_CONCURRENCY for p in pools):
        parser.error(f"--pool takes {', '.join(POOL_CONCURRENCY)}, got {args.pool!r}")
    if len(pools) > 1:
        for pool in pools:
            print(f"## pool {pool}\n")
            main([*_without_pool(argv or []), "--pool", pool])
        return
    _POOL.update(pool=pools[0], concurrency=args.concurrency or POOL_CONCURRENCY[pools[0]])
    if not 1 <= args.repeat <= 20:
        parser.error(f"--repeat must be 1 to 20, got {args.repeat}")
    logs = Path(tempfile.mkdtemp(prefix="cbtasks-bench-"))
    if args.idle:
        idle_run(args.idle, logs)
    sent = f"at {args.rate:g}/s" if args.rate else "at once"
    print(
        f"{args.tasks} tasks sent {sent}, one worker (pool {_POOL['pool']}, concurrency "
        f"{_POOL['concurrency']}), outage {args.outage:g} s, "
        f"open period {args.open_seconds:g} s, "
        f"medians of {args.repeat} runs (variants take turns); logs in {logs}\n"
    )
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in chosen}
    # A healthy run of the same task right after each outage run, in the same
    # round: the drain is compared with the pace the workers had just then
    # (one healthy run per variant moved the ratio by 0.1 on a shared machine).
    healthy: dict[str, list[tuple[float, float]]] = {variant: [] for variant in chosen}
    for _ in range(args.repeat):
        for variant in chosen:
            runs[variant].append(
                outage_run(
                    VARIANTS[variant],
                    args.tasks,
                    args.outage,
                    args.latency_ms,
                    logs,
                    rate=args.rate,
                    open_seconds=args.open_seconds,
                )
            )
            if args.healthy:
                healthy[variant].append(
                    healthy_run(VARIANTS[variant], args.healthy, args.latency_ms, logs)
                )
    baseline = "celery autoretry" if "celery autoretry" in runs else chosen[0]
    rows: list[tuple[str, ...]] = []
    for variant in chosen:
        figures = {
            key: statistics.median(run[key] for run in runs[variant]) for key in runs[variant][0]
        }
        # Times as a ratio against the baseline's run in the same round: noise cancels.
        ratio = statistics.median(
            mine[_TIME] / max(theirs[_TIME], 0.1)
            for mine, theirs in zip(runs[variant], runs[baseline], strict=True)
        )
        figures[f"time vs {baseline}"] = round(ratio, 2)
        if args.healthy:
            paired = list(zip(runs[variant], healthy[variant], strict=True))
            rate = statistics.median(pace for pace, _ in healthy[variant])
            commands = statistics.median(count for _, count in healthy[variant])
            figures["healthy rate (tasks/s)"] = round(rate)
            # The median of each round's ratio, as with the times above.
            figures["drain vs healthy"] = round(
                statistics.median(
                    run["drain rate (tasks/s)"] / max(pace, 1e-3) for run, (pace, _) in paired
                ),
                2,
            )
            figures["healthy commands per task"] = round(commands, 1)
            figures["commands vs healthy"] = round(
                figures["Redis commands per task"] / max(commands, 1e-3), 2
            )
        if not rows:
            rows.append(("variant", *figures))
        rows.append((variant, *(f"{v:g}" for v in figures.values())))
    print(table(rows))
    if args.backlog:
        print(f"\nbacklog: {args.backlog} requests while the circuit is forced open (one run)\n")
        rows = []
        for variant in ("cbtasks park", "cbtasks countdown"):
            figures = backlog_run(VARIANTS[variant], args.backlog, logs)
            if not rows:
                rows.append(("variant", *figures))
            rows.append((variant, *(str(v) for v in figures.values())))
        print(table(rows))


def _without_pool(argv: list[str]) -> list[str]:
    """``argv`` without its --pool option (main() runs once per pool)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--pool":
            skip = True
            continue
        if not arg.startswith("--pool="):
            kept.append(arg)
    return kept


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
