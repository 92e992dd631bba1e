"""What a healthy task costs in Redis commands: cbtasks against plain Celery, same run.

    python -m bench.healthy_cost [--tasks 400] [--rounds 3]

One Redis (broker, results and breaker state), the reference model server and
a worker of 4 processes. Each round sends --tasks healthy predictions through
plain Celery (``workers.predict_autoretry``: no breaker, nothing goes wrong)
and the same number through cbtasks (``workers.predict``), the two taking
turns, and counts the commands Redis served for each batch (INFO
commandstats, scripts' own commands included). Printed: the medians per
task, by command, and the difference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import redis

from bench._timing import table
from cbtasks._testing.processes import CeleryWorker, ModelServer, client_app
from cbtasks._testing.redis_server import RedisServer

FEATURES = [5.1, 3.5, 1.4, 0.2]
VARIANTS = {"plain Celery": "workers.predict_autoretry", "cbtasks": "workers.predict"}


def batch(client: Any, app: Any, task: str, tasks: int) -> dict[str, int]:
    """Commands Redis served, by command, while ``tasks`` of ``task`` ran."""
    client.config_resetstat()
    results = [app.send_task(task, (FEATURES,)) for _ in range(tasks)]
    for result in results:
        result.get(timeout=120)
    stats = client.info("commandstats")
    return {
        key.removeprefix("cmdstat_"): int(value["calls"])
        for key, value in stats.items()
        if key not in ("cmdstat_config|resetstat", "cmdstat_info")
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 10 <= args.tasks <= 100_000:
        parser.error("--rounds is 1 to 20 and --tasks 10 to 100000")
    logs = Path(tempfile.mkdtemp(prefix="cbtasks-bench-healthy-"))
    with RedisServer() as server, ModelServer() as model:
        env = {"CBTASKS_REDIS_URL": server.url, "CBTASKS_MODEL_URL": model.url}
        worker = CeleryWorker(env, concurrency=4, log_path=logs / "w.log", app="bench.baselines")
        worker.start()
        try:
            app = client_app(server.url, "bench-healthy")
            client = redis.Redis.from_url(server.url)
            for task in VARIANTS.values():  # warm every pool process and connection
                batch(client, app, task, 40)
            runs: dict[str, list[dict[str, int]]] = {name: [] for name in VARIANTS}
            for _ in range(args.rounds):
                for name, task in VARIANTS.items():
                    runs[name].append(batch(client, app, task, args.tasks))
        finally:
            worker.stop()
    commands = sorted({c for per in runs.values() for run in per for c in run})
    medians = {
        name: {c: statistics.median(run.get(c, 0) for run in per) / args.tasks for c in commands}
        for name, per in runs.items()
    }
    rows = [("command", *VARIANTS, "difference")]
    for command in commands:
        plain, ours = medians["plain Celery"][command], medians["cbtasks"][command]
        if plain or ours:
            rows.append((command, f"{plain:.2f}", f"{ours:.2f}", f"{ours - plain:+.2f}"))
    totals = {name: sum(m.values()) for name, m in medians.items()}
    rows.append(
        (
            "all",
            f"{totals['plain Celery']:.2f}",
            f"{totals['cbtasks']:.2f}",
            f"{totals['cbtasks'] - totals['plain Celery']:+.2f}",
        )
    )
    print(
        f"Redis commands per healthy task, medians of {args.rounds} rounds of {args.tasks} "
        f"tasks each (variants take turns), one worker of 4 processes; logs in {logs}\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
