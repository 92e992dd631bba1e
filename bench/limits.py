"""A limit for the whole fleet: rate, concurrency, cost, and a backlog drained at the limit.

    python -m bench.limits [--sections rate,concurrency,cost,backlog] [--rounds 1]
                           [--rate-calls 3000] [--backlog 5000] [--service-ms 50]

Each section starts its own Redis (broker, results, breaker state), the
reference model server and a fleet of Celery workers (``bench.baselines``),
and measures at the server (every request's arrival time and status):

- rate: ``Limit(rate="50/s")`` on 3 workers x 4 processes, --rate-calls tasks
  sent at once, by countdown (the default) and by pause; beside it Celery's
  own ``rate_limit="50/s"`` on the same fleet. Printed: the achieved rate
  (calls / time from the first arrival to the last), the most calls that
  arrived in any one second, and Redis commands per task.
- concurrency: ``Limit(concurrency=8)``, --service-ms calls, 3 workers x 4
  processes: the most calls in flight at the server, and throughput against 8
  / service time; then the same with one worker SIGKILLed mid-run: tasks
  lost, run twice, and how long until the fleet used all 8 slots again (the
  dead worker's come back when their 3 s lease ends).
- cost: Redis commands per healthy task, plain Celery against cbtasks without
  a limit and with limits that never refuse (concurrency 1000; rate 10000/s).
- backlog: --backlog tasks sent at once under ``Limit(rate="100/s")``, by pause
  and by countdown, against a healthy unlimited run of the same tasks on the
  same fleet: drain rate, Redis commands per task (ratio to the healthy run's),
  worst worker process growth, requests deferred (handled more than once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench._memory import MemoryWatch
from bench._timing import table
from cbtasks import RedisStore
from cbtasks._testing.processes import CeleryWorker, ModelServer, client_app
from cbtasks._testing.redis_server import RedisServer

FEATURES = [5.1, 3.5, 1.4, 0.2]
SECTIONS = ("rate", "concurrency", "cost", "backlog")
#: The queue of bench.limited_paused: the breaker's own.
PAUSED_QUEUE = "bench-limited"


@dataclass
class Fleet:
    """Redis, the model server and the workers of one run."""

    redis: Any
    app: Any
    model: ModelServer
    workers: list[CeleryWorker]
    store: RedisStore
    logs: Path
    watches: list[MemoryWatch] = field(default_factory=list)

    def send(self, task: str, count: int) -> list[Any]:
        queue = PAUSED_QUEUE if task == "bench.limited_paused" else "celery"
        return [self.app.send_task(task, (FEATURES,), queue=queue) for _ in range(count)]


@contextlib.contextmanager
def fleet(
    name: str,
    *,
    workers: int = 3,
    concurrency: int = 4,
    limit: dict[str, Any] | None = None,
    celery_rate: str | None = None,
    visibility_timeout: float | None = None,
) -> Iterator[Fleet]:
    logs = Path(tempfile.mkdtemp(prefix=f"cbtasks-bench-limits-{name}-"))
    with RedisServer() as server, ModelServer() as model:
        env = {"CBTASKS_REDIS_URL": server.url, "CBTASKS_MODEL_URL": model.url}
        if limit is not None:
            env["CBTASKS_BENCH_LIMIT"] = json.dumps(limit)
        if celery_rate is not None:
            env["CBTASKS_BENCH_CELERY_RATE"] = celery_rate
        if visibility_timeout is not None:
            env["CBTASKS_VISIBILITY_TIMEOUT"] = str(visibility_timeout)
        started = [
            CeleryWorker(
                env,
                concurrency=concurrency,
                queues=f"celery,{PAUSED_QUEUE}",
                name=f"{name}{i}",
                log_path=logs / f"worker{i}.log",
                app="bench.baselines",
                prefetch_multiplier=1,
            ).start()
            for i in range(workers)
        ]
        store = RedisStore(server.url)
        try:
            run = Fleet(
                redis.Redis.from_url(server.url),
                client_app(server.url, f"bench-limits-{name}"),
                model,
                started,
                store,
                logs,
            )
            warm(run)
            yield run
        finally:
            for worker in started:
                worker.stop()
            store.close()


def warm(run: Fleet) -> None:
    """Every pool process's first call (its connections, its breaker) before measuring."""
    results = run.send("workers.predict", 8 * len(run.workers))
    for result in results:
        result.get(timeout=120)
    run.model.reset_stats()
    run.redis.config_resetstat()


def commands(run: Fleet) -> int:
    """Commands Redis served since the last reset, scripts' own included."""
    stats = run.redis.info("commandstats")
    return sum(
        int(v["calls"])
        for k, v in stats.items()
        if k not in ("cmdstat_config|resetstat", "cmdstat_info")
    )


def busiest_second(times: list[float]) -> int:
    """The most of ``times`` that fall in any one second."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def drained(run: Fleet, results: list[Any], timeout: float = 900) -> list[dict[str, Any]]:
    return [r.get(timeout=timeout) for r in results]


def drained_within(results: list[Any], seconds: float) -> int:
    """Wait for ``results`` up to ``seconds``; how many finished (a slow baseline is cut)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done = sum(1 for r in results if r.ready())
        if done == len(results):
            return done
        time.sleep(0.5)
    return sum(1 for r in results if r.ready())


# -- rate --------------------------------------------------------------------------------


def rate_section(calls: int, rounds: int) -> None:
    variants = {
        "cbtasks default (waits up to 1 s)": ("bench.limited", {"rate": "50/s"}, None),
        "cbtasks pause": ("bench.limited_paused", {"rate": "50/s"}, None),
        "cbtasks countdown, limit_wait=0": ("bench.limited_countdown", {"rate": "50/s"}, None),
        "Celery rate_limit=50/s": ("bench.celery_rated", None, "50/s"),
    }
    rows: dict[str, list[tuple[float, int, int, float, int]]] = {name: [] for name in variants}
    # Four times the time the limit needs: a baseline slower than that is cut off.
    budget = 4 * calls / 50
    for _ in range(rounds):
        for name, (task, limit, celery_rate) in variants.items():
            with fleet("rate", limit=limit, celery_rate=celery_rate) as run:
                results = run.send(task, calls)
                done = drained_within(results, budget)
                arrived = run.model.arrivals()
                rate = (len(arrived) - 1) / (arrived[-1] - arrived[0])
                per_task = commands(run) / max(1, done)
                started = [r.result["started_at"] for r in results if r.successful()]
                rows[name].append(
                    (rate, busiest_second(started), busiest_second(arrived), per_task, done)
                )
    out = [
        ("variant", "achieved /s", "vs 50/s", "busiest second: started", "at the server",
         "commands/task", "done in time")
    ]  # fmt: skip
    for name, runs in rows.items():
        rate = statistics.median(r[0] for r in runs)
        out.append(
            (
                name,
                f"{rate:.2f}",
                f"{rate / 50 - 1:+.1%}",
                str(max(r[1] for r in runs)),
                str(max(r[2] for r in runs)),
                f"{statistics.median(r[3] for r in runs):.2f}",
                f"{min(r[4] for r in runs)}/{calls}",
            )
        )
    print(
        f"\n### rate: {calls} tasks sent at once, 3 workers x 4 processes, medians of "
        f"{rounds} round(s); the rate measured at the server (first arrival to last); the "
        "busiest second (the worst round's) both where the task body started, just after the "
        "limit admitted it, and at the server (a call's trip there adds its jitter); "
        f"a variant not done in {budget:.0f} s is measured on what it did\n"
    )
    print(table(out))


# -- concurrency ------------------------------------------------------------------------


def concurrency_section(calls: int, service_ms: float = 50) -> None:
    limit = {"concurrency": 8, "lease": 3}
    service = service_ms / 1000
    header = ("run", "peak in flight", "throughput /s", "vs 8/service", "vs 8 callers")
    out: list[tuple[str, ...]] = [(*header, "lost", "twice", "dead slots back (s)")]
    # The baseline: 8 callers and no limit (2 workers x 4): what 8 calls at once make of
    # the server here, the client's own time per call included.
    with fleet("conc8", workers=2) as run:
        run.model.faults(latency_ms=service * 1000)
        drained(run, run.send("workers.predict", calls))
        arrived = run.model.arrivals()
        callers8 = (len(arrived) - 1) / (arrived[-1] - arrived[0])
        peak = run.model.stats()["phases"]["default"]["peak_in_flight"]
        out.append(
            ("8 callers, no limit", str(peak), f"{callers8:.1f}",
             f"{callers8 / (8 / service):.2f}", "1.00", "0", "0", "-")
        )  # fmt: skip
    with fleet("conc", limit=limit) as run:
        run.model.faults(latency_ms=service * 1000)
        drained(run, run.send("bench.limited", calls))
        stats = run.model.stats()
        arrived = run.model.arrivals()
        rate = (len(arrived) - 1) / (arrived[-1] - arrived[0])
        peak = stats["phases"]["default"]["peak_in_flight"]
        out.append(
            ("Limit(concurrency=8), 12 callers", str(peak), f"{rate:.1f}",
             f"{rate / (8 / service):.2f}", f"{rate / callers8:.2f}", "0",
             str(stats["calls_after_success"]), "-")
        )  # fmt: skip
    with fleet("kill", limit=limit, visibility_timeout=10) as run:
        run.model.faults(latency_ms=service * 1000)
        slots_key = "cbtasks:{bench-limited}:c"
        results = run.send("bench.limited", calls)
        deadline = time.monotonic() + 120
        while sum(1 for r in results if r.ready()) < calls // 2:
            assert time.monotonic() < deadline, "the first half did not finish"
            time.sleep(0.05)
        run.workers[-1].kill(signal.SIGKILL)
        killed_at = time.monotonic()
        # The slots held at the kill: the live holders give theirs back within a call,
        # the dead worker's stay until their lease ends.
        held = {m for m in run.redis.zrange(slots_key, 0, -1)}
        back = None
        while back is None and time.monotonic() - killed_at < 30:
            if not held & set(run.redis.zrange(slots_key, 0, -1)):
                back = time.monotonic() - killed_at
            time.sleep(0.02)
        answers = [r.get(timeout=300) for r in results]
        stats = run.model.stats()
        out.append(
            ("a worker SIGKILLed half way", str(stats["phases"]["default"]["peak_in_flight"]),
             "-", "-", "-", str(calls - len(answers)), str(stats["calls_after_success"]),
             "-" if back is None else f"{back:.2f}")
        )  # fmt: skip
    print(
        f"\n### concurrency: Limit(concurrency=8, lease=3), {calls} tasks of "
        f"{service * 1000:.0f} ms at once, 3 workers x 4 processes (the baseline: 8 callers, "
        "2 workers x 4, no limit); the kill run SIGKILLs one worker of the three half way "
        "(its requests come back after a 10 s visibility timeout); twice: calls the server "
        "answered for a request it had answered before\n"
    )
    print(table(out))


# -- cost ---------------------------------------------------------------------------------


def cost_section(tasks: int, rounds: int) -> None:
    variants = {
        "plain Celery": ("workers.predict_autoretry", None),
        "cbtasks, no limit": ("workers.predict", None),
        "cbtasks, Limit(concurrency=1000)": ("bench.limited", {"concurrency": 1000}),
        "cbtasks, Limit(rate=10000/s)": ("bench.limited", {"rate": "10000/s"}),
    }
    per_task: dict[str, list[float]] = {name: [] for name in variants}
    by_command: dict[str, dict[str, float]] = {}
    for name, (task, limit) in variants.items():
        with fleet("cost", workers=1, limit=limit) as run:
            for _ in range(rounds):
                run.redis.config_resetstat()
                drained(run, run.send(task, tasks))
                per_task[name].append(commands(run) / tasks)
                stats = run.redis.info("commandstats")
                by_command[name] = {
                    k.removeprefix("cmdstat_"): int(v["calls"]) / tasks
                    for k, v in stats.items()
                    if k not in ("cmdstat_config|resetstat", "cmdstat_info")
                }
    base = statistics.median(per_task["cbtasks, no limit"])
    plain = statistics.median(per_task["plain Celery"])
    out = [("variant", "commands/task", "vs cbtasks, no limit", "vs plain Celery", "EVALSHA/task")]
    for name, runs in per_task.items():
        median = statistics.median(runs)
        out.append(
            (
                name,
                f"{median:.2f}",
                f"{median - base:+.2f}",
                f"{median - plain:+.2f}",
                f"{by_command[name].get('evalsha', 0):.2f}",
            )
        )
    print(
        f"\n### cost: Redis commands per healthy task, medians of {rounds} rounds of {tasks} "
        "tasks, one worker of 4 processes each\n"
    )
    print(table(out))


# -- backlog -----------------------------------------------------------------------------


def backlog_section(tasks: int) -> None:
    limit = {"rate": "100/s"}
    # Each mode beside the same task on the same fleet without a limit: what the limit
    # adds, the mode's own periodic work (the pause gate's re-checks) counted in both.
    variants = {
        "pause, no limit (baseline)": ("bench.limited_paused", None),
        "pause": ("bench.limited_paused", limit),
        "default, no limit (baseline)": ("bench.limited", None),
        "default (waits up to 1 s)": ("bench.limited", limit),
        "countdown, limit_wait=0": ("bench.limited_countdown", limit),
    }
    header = ("variant", "drain /s", "vs 100/s", "commands/task", "vs its baseline")
    out: list[tuple[str, ...]] = [(*header, "worst growth", "deferred")]
    baseline = 0.0
    for name, (task, chosen) in variants.items():
        with fleet("backlog", limit=chosen) as run:
            watches = [MemoryWatch(w.process.pid).start() for w in run.workers if w.process]
            answers = drained(run, run.send(task, tasks))
            for watch in watches:
                watch.stop()
            arrived = run.model.arrivals()
            rate = (len(arrived) - 1) / (arrived[-1] - arrived[0])
            per_task = commands(run) / tasks
            if chosen is None:
                baseline = per_task
            growth = max(w.worst_growth for w in watches) / 2**20
            deferred = sum(1 for a in answers if a.get("deferrals"))
            out.append(
                (
                    name,
                    f"{rate:.1f}",
                    "-" if chosen is None else f"{rate / 100 - 1:+.1%}",
                    f"{per_task:.2f}",
                    f"{per_task / baseline:.2f}x",
                    f"{growth:.1f} MB",
                    str(deferred),
                )
            )
    print(
        f"\n### backlog: Limit(rate=100/s), {tasks} tasks sent at once, 3 workers x 4 "
        "processes; drain measured at the server (first arrival to last); each mode against "
        "the same task without a limit on the same fleet\n"
    )
    print(table(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--rate-calls", type=int, default=3000)
    parser.add_argument("--concurrency-calls", type=int, default=1200)
    # A longer call shows the limit's own cost against 8 / service time apart from the
    # client's fixed time per call (about 12 ms a call on a 2-core machine).
    parser.add_argument("--service-ms", type=float, default=50)
    parser.add_argument("--cost-tasks", type=int, default=400)
    parser.add_argument("--backlog", type=int, default=5000)
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds is 1 to 10")
    if not 1 <= args.service_ms <= 5000:
        parser.error("--service-ms is 1 to 5000 (milliseconds per call at the server)")
    print("## Fleet-wide limits (bench/limits.py)")
    if "rate" in sections:
        rate_section(args.rate_calls, args.rounds)
    if "concurrency" in sections:
        concurrency_section(args.concurrency_calls, args.service_ms)
    if "cost" in sections:
        cost_section(args.cost_tasks, max(args.rounds, 3))
    if "backlog" in sections:
        backlog_section(args.backlog)


if __name__ == "__main__":
    main()
