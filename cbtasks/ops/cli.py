"""The ``cbtasks`` command: see and steer the breakers of a whole fleet.

    cbtasks status [--json]         every breaker: state, failures, open until, probes, parked
    cbtasks open|close|reset|disable|enable NAME   cluster-wide (open asks; --yes skips)
    cbtasks watch [--interval S]    a live view
    cbtasks batch INPUT.jsonl --task MODULE.TASK --out OUTPUT.jsonl
    cbtasks metrics [--port N]              Prometheus metrics of the breakers in Redis
    cbtasks demo                            the demo (see ``python -m cbtasks.ops.demo``)

Every verb that talks to Redis takes ``--redis-url``, by default the
``CBTASKS_REDIS_URL`` environment variable. Exit codes: 0 done, 1 failed
(an unknown breaker, a batch with failures), 2 bad arguments or Redis unreachable.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

from .._errors import PolicyError, StoreError, StoreUnavailableError
from .._policy import BreakerPolicy
from ..stores import BreakerStatus, RedisStore
from ..stores._parking import ParkingLot

COMMANDS = {
    "open": "force_open",
    "close": "force_close",
    "reset": "reset",
    "disable": "disable",
    "enable": "enable",
}
PREFIX = "cbtasks"


class CLIError(Exception):
    """Printed without a traceback; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _store(args: argparse.Namespace) -> RedisStore:
    url = args.redis_url or os.environ.get("CBTASKS_REDIS_URL")
    if not url:
        raise CLIError("no Redis to ask: pass --redis-url or set CBTASKS_REDIS_URL", 2)
    try:
        store = RedisStore(url, prefix=args.prefix, timeout=2.0)
        store.ping()
    except PolicyError as exc:
        raise CLIError(str(exc), 2) from None
    except StoreError as exc:
        raise CLIError(str(exc), 2) from None
    return store


def status_rows(store: RedisStore) -> list[dict[str, Any]]:
    """Every breaker in the store, as plain data."""
    rows = []
    for name in store.names():
        try:
            status = store.status(name, BreakerPolicy().wire())
        except StoreUnavailableError:
            raise
        except StoreError as exc:  # one corrupt breaker: show it, and the rest
            rows.append({"name": name, "state": "corrupt", "error": str(exc)})
            continue
        if status is None:
            continue
        rows.append(_as_dict(status, ParkingLot(store.client, store.prefix, name)))
    return rows


def _as_dict(status: BreakerStatus, lot: ParkingLot) -> dict[str, Any]:
    return {
        "name": status.name,
        "state": status.state.value,
        "mode": status.mode.name.lower(),
        "open_until": status.open_until,
        "trips": status.trips,
        "consecutive_failures": status.consecutive_failures,
        "window_calls": status.window_calls,
        "window_failures": status.window_failures,
        "probes_in_use": status.probes_in_use,
        "parked": lot.count(),
        # Parked requests that could not be released (poison), kept for an operator.
        "dead_letters": lot.dead_count(),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no breakers yet (a breaker appears after its first call)"
    header = (
        "NAME", "STATE", "MODE", "FAILURES", "TRIPS", "OPEN UNTIL", "PROBES", "PARKED", "DEAD",
    )  # fmt: skip
    lines = [header]
    for row in rows:
        if row["state"] == "corrupt":
            lines.append((row["name"], "corrupt", *("-" * (len(header) - 2))))
            continue
        lines.append(
            (
                row["name"],
                row["state"],
                row["mode"],
                # Failures are counted while closed; an open circuit counts none.
                str(row["consecutive_failures"]) if row["state"] == "closed" else "-",
                str(row["trips"]),
                _open_until(row),
                str(row["probes_in_use"]),
                str(row["parked"]),
                str(row["dead_letters"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def _open_until(row: dict[str, Any]) -> str:
    if row["mode"] == "forced_open":
        return "until closed"  # an operator's open has no end of its own
    until = row["open_until"]
    return datetime.datetime.fromtimestamp(until).strftime("%H:%M:%S.%f")[:-3] if until else "-"


def cmd_status(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = status_rows(store)
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    store.close()
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.name not in store.names():
        known = ", ".join(store.names()) or "none yet"
        raise CLIError(f"no breaker named {args.name!r} (known: {known})", 1)
    if args.verb == "open" and not args.yes:
        if not sys.stdin.isatty():
            raise CLIError("opening a breaker stops calls on every worker: confirm with --yes", 2)
        answer = input(f"open {args.name!r} on every worker, stopping its calls? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing changed")
            return 1
    store.control(args.name, BreakerPolicy().wire(), COMMANDS[args.verb])
    status = store.status(args.name, BreakerPolicy().wire())
    assert status is not None
    row = _as_dict(status, ParkingLot(store.client, store.prefix, args.name))
    print(json.dumps(row) if args.json else f"{args.name}: {row['state']} ({row['mode']})")
    store.close()
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    store = _store(args)
    shown = 0
    try:
        while args.count is None or shown < args.count:
            try:
                view = _table(status_rows(store))
            except StoreUnavailableError as exc:  # keep watching: say so, try again
                view = f"{exc}; trying again every {args.interval:g} s"
            if sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(time.strftime("%H:%M:%S"), "(Ctrl-C to stop)")
            print(view, flush=True)
            shown += 1
            if args.count is None or shown < args.count:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    return run_batch(args)


def cmd_metrics(args: argparse.Namespace) -> int:
    from .metrics import serve_store_metrics

    store = _store(args)
    serve_store_metrics(store, args.port, args.host)
    print(f"serving breaker metrics on http://{args.host}:{args.port}/metrics (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo

    return demo(args.demo_args)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="cbtasks", description="See and steer cbtasks circuit breakers."
    )
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")

    def with_redis(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--redis-url", help="Redis with the breakers (default: $CBTASKS_REDIS_URL)")
        p.add_argument("--prefix", default=PREFIX, help="key prefix (default: cbtasks)")
        return p

    status = with_redis(verbs.add_parser("status", help="every breaker's state"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=cmd_status)
    for verb, what in (
        ("open", "open a breaker until closed or reset (asks first)"),
        ("close", "close a breaker now"),
        ("reset", "forget a breaker's counts and backoff"),
        ("disable", "shadow mode: admit every call, keep counting"),
        ("enable", "leave shadow mode or a forced open"),
    ):
        p = with_redis(verbs.add_parser(verb, help=what))
        p.add_argument("name", help="the breaker's name")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        # Every verb that changes state takes --yes; only open asks without it.
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        p.set_defaults(run=cmd_control)
    watch = with_redis(verbs.add_parser("watch", help="a live view of every breaker"))
    watch.add_argument("--interval", type=_positive, default=1.0, help="seconds between updates")
    watch.add_argument(
        "--count", type=_at_least_one, default=None, help="stop after this many updates"
    )
    watch.set_defaults(run=cmd_watch)
    batch = with_redis(verbs.add_parser("batch", help="run a JSONL file of inputs through a task"))
    batch.add_argument(
        "input", help="JSONL: one JSON array of arguments, or object of keyword arguments, a line"
    )
    batch.add_argument("--task", required=True, help="MODULE.TASK, e.g. workers.app.predict")
    batch.add_argument("--out", required=True, help="JSONL output; rerunning resumes it")
    batch.add_argument("--chunk", type=int, default=100, help="rows in flight at once (1-10000)")
    batch.add_argument("--queue", default=None, help="queue to send to (default: the task's)")
    batch.add_argument(
        "--timeout", type=_positive, default=3600.0, help="seconds to wait for a row"
    )
    batch.set_defaults(run=cmd_batch)
    metrics = with_redis(
        verbs.add_parser("metrics", help="serve Prometheus metrics of the breakers in Redis")
    )
    metrics.add_argument("--port", type=int, default=9108, help="port (default 9108)")
    metrics.add_argument("--host", default="127.0.0.1", help="address to listen on")
    metrics.set_defaults(run=cmd_metrics)
    demo = verbs.add_parser("demo", help="the demo: a batch through an outage")
    demo.add_argument(
        "demo_args", nargs=argparse.REMAINDER, help="options for python -m cbtasks.ops.demo"
    )
    demo.set_defaults(run=cmd_demo)
    return top


def _at_least_one(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {value!r}")
    return int(value)


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value!r}")
    return number


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except CLIError as exc:
        print(f"cbtasks {args.verb}: {exc}", file=sys.stderr)
        return exc.code
    except StoreUnavailableError as exc:
        print(f"cbtasks {args.verb}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
