"""The ``cbtasks`` command: see and steer the breakers of a whole fleet.

    cbtasks status [--json]         every breaker: state, failures, open until, probes, parked
    cbtasks open|close|half-open|reset|disable|enable NAME [--why TEXT]
                                    cluster-wide (open asks; --yes skips); into the history
    cbtasks history NAME [--since 1h] [--json]   its transitions and operators' commands
    cbtasks watch [--interval S]    a live view
    cbtasks waited NAME             requests that waited for NAME's circuit: how long, why
    cbtasks batch INPUT.jsonl --task MODULE.TASK --out OUTPUT.jsonl
    cbtasks metrics [--port N]              Prometheus metrics of the breakers in Redis
    cbtasks demo                            the demo (see ``python -m cbtasks.ops.demo``)

The same verbs run under Celery's own command, which reads the Redis URL and
prefix from the app's config: ``celery -A workers.app cbtasks status``.

Every verb that talks to Redis takes ``--redis-url``; without it, the app's
``cbtasks_redis_url`` (under ``celery -A``), else ``CBTASKS_REDIS_URL``.
Exit codes: 0 done, 1 failed (an unknown breaker, a batch with failures),
2 bad arguments or Redis unreachable. Tables and the live view use rich on a
terminal and plain aligned lines elsewhere (logs, pipes, scripts).
"""

from __future__ import annotations

import datetime
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from .._breaker import CircuitBreaker
from .._errors import PolicyError, StoreError, StoreUnavailableError
from ..stores import RedisStore
from ..stores._keys import DEFAULT_PREFIX
from ..stores._parking import ParkingLot
from ._fleet import OPERATOR_POLICY, known_breaker, paused_workers, read_fleet, recent_waits
from ._views import as_dict, history_table, plain_table, rich_table, waits_table

COMMANDS = {
    "open": ("force_open", "open a breaker until closed or reset (asks first)"),
    "close": ("force_close", "close a breaker now"),
    "half-open": ("force_half_open", "half-open a breaker now: the next calls probe"),
    "reset": ("reset", "forget a breaker's counts and backoff"),
    "disable": ("disable", "shadow mode: admit every call, keep counting"),
    "enable": ("enable", "leave shadow mode or a forced open"),
}


class CLIError(click.ClickException):
    """Printed as ``cbtasks VERB: message``, without a traceback; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]  # click reads it per instance

    def show(self, file: Any = None) -> None:
        ctx = click.get_current_context(silent=True)
        verb = f" {ctx.info_name}" if ctx is not None and ctx.parent is not None else ""
        click.echo(f"cbtasks{verb}: {self.format_message()}", err=True)


def _celery_app(ctx: click.Context) -> Any:
    """The Celery app when run as ``celery -A proj cbtasks ...``, else None."""
    root = ctx.find_root().obj
    return getattr(root, "app", None)


def _store(ctx: click.Context, redis_url: str | None, prefix: str | None) -> RedisStore:
    app = _celery_app(ctx)
    if not redis_url and app is not None:
        from ..task._options import redis_url as app_redis_url

        try:
            redis_url = app_redis_url(app)
        except PolicyError as exc:
            raise CLIError(str(exc), 2) from None
        prefix = prefix or app.conf.get("cbtasks_prefix")
    url = redis_url or os.environ.get("CBTASKS_REDIS_URL")
    if not url:
        raise CLIError("no Redis to ask: pass --redis-url or set CBTASKS_REDIS_URL", 2)
    try:
        store = RedisStore(url, prefix=prefix or DEFAULT_PREFIX, timeout=2.0)
        store.ping()
        store.refuse_one_cluster_node()  # one node would show only its own breakers
    except (PolicyError, StoreError) as exc:
        raise CLIError(str(exc), 2) from None
    return store


def with_redis(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--prefix", default=None, help="key prefix (default: cbtasks, or the app's)"
    )(command)
    return click.option(
        "--redis-url",
        default=None,
        help="Redis with the breakers (default: the app's, else $CBTASKS_REDIS_URL)",
    )(command)


def status_rows(store: RedisStore) -> list[dict[str, Any]]:
    """Every breaker in the store, as plain data."""
    return [
        {"name": read.name, "state": "corrupt", "error": read.error}
        if read.status is None
        else as_dict(read.status, read.lot, read.paused)
        for read in read_fleet(store)
    ]


def _terminal() -> bool:
    return sys.stdout.isatty()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """See and steer cbtasks circuit breakers."""


@main.command()
@with_redis
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def status(ctx: click.Context, redis_url: str | None, prefix: str | None, as_json: bool) -> None:
    """Every breaker's state.

    \b
    NAME           the breaker (a task's breaker is named after its endpoint or task)
    STATE          closed (calls go through), open (calls refused), half_open (probes)
    MODE           normal, or an operator's forced_open / forced_closed / disabled
    FAILURES       failures in a row while closed ("-" when not closed)
    TRIPS ROW/ALL  times opened since it last closed (they lengthen the open
                   period) / since it was made or reset
    OPEN UNTIL     when an open circuit lets its first probe through (local time)
    PROBES         half-open probe calls in flight now
    PARKED         requests waiting in Redis for the circuit (defer="park")
    DEAD           parked requests that could not be sent back (not a request of
                   this breaker's task): kept, never run, in the Redis hash
                   cbtasks:{NAME}:parked:dead (request id -> message, reason)
    PAUSED         workers not consuming the breaker's queue (defer="pause")
    LIMIT          calls in flight / the limit, calls admitted in the last second
    LAST FAILURE   the last failure counted: why it opened, if it did
    """
    with _store(ctx, redis_url, prefix) as store:
        rows = status_rows(store)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif _terminal():
        from rich.console import Console

        Console().print(rich_table(rows))
    else:
        click.echo(plain_table(rows))


def _control_command(verb: str, op: str, what: str) -> click.Command:
    @click.command(verb, help=what[0].upper() + what[1:] + ".")
    @click.argument("name")
    @with_redis
    @click.option("--json", "as_json", is_flag=True, help="machine-readable output")
    # Every verb that changes state takes --yes; only open asks without it.
    @click.option("--yes", is_flag=True, help="do not ask for confirmation")
    @click.option("--why", default="", help="why, for the breaker's history")
    @click.pass_context
    def control(
        ctx: click.Context,
        name: str,
        redis_url: str | None,
        prefix: str | None,
        as_json: bool,
        yes: bool,
        why: str,
    ) -> None:
        with _store(ctx, redis_url, prefix) as store:
            if unknown := known_breaker(store, name):
                raise CLIError(unknown)
            if verb == "open" and not yes:
                if not sys.stdin.isatty():
                    raise CLIError(
                        "opening a breaker stops calls on every worker: confirm with --yes", 2
                    )
                if not click.confirm(f"open {name!r} on every worker, stopping its calls?"):
                    click.echo("nothing changed")
                    ctx.exit(1)
            # Through the breaker, as any caller: its command is one atomic step, noted
            # in the history with who gave it.
            breaker = CircuitBreaker(name, store=store)
            getattr(breaker, op)(by=_operator(), why=why)
            now = store.status(name, OPERATOR_POLICY)
            assert now is not None
            lot = ParkingLot(store.client, store.prefix, name)
            row = as_dict(now, lot, paused_workers(store, name))
        click.echo(json.dumps(row) if as_json else f"{name}: {row['state']} ({row['mode']})")

    return control


for _verb, (_op, _what) in COMMANDS.items():
    main.add_command(_control_command(_verb, _op, _what))


@main.command()
@with_redis
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    help="seconds between updates",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="stop after this many")
@click.pass_context
def watch(
    ctx: click.Context,
    redis_url: str | None,
    prefix: str | None,
    interval: float,
    count: int | None,
) -> None:
    """A live view of every breaker (keeps watching while Redis is away)."""
    store = _store(ctx, redis_url, prefix)

    def view() -> tuple[list[dict[str, Any]] | None, str]:
        try:
            return status_rows(store), time.strftime("%H:%M:%S")
        except StoreUnavailableError as exc:  # keep watching: say so, try again
            return None, f"{exc}; trying again every {interval:g} s"

    try:
        if _terminal():
            _live(view, interval, count)
        else:
            shown = 0
            while count is None or shown < count:
                rows, note = view()
                click.echo(f"{note}\n{plain_table(rows)}" if rows is not None else note)
                shown += 1
                if count is None or shown < count:
                    time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()


def _live(view: Callable[[], tuple[Any, str]], interval: float, count: int | None) -> None:
    from rich.live import Live

    with Live(auto_refresh=False) as live:
        shown = 0
        while count is None or shown < count:
            rows, note = view()
            title = f"{note} (Ctrl-C to stop)"
            live.update(rich_table(rows, title) if rows is not None else note, refresh=True)
            shown += 1
            if count is None or shown < count:
                time.sleep(interval)


@main.command()
@click.argument("name")
@with_redis
@click.option("--limit", type=click.IntRange(1, 1000), default=20, help="newest N (default 20)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def waited(
    ctx: click.Context,
    name: str,
    redis_url: str | None,
    prefix: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Requests that waited for NAME's circuit and then ran: how long, and why."""
    with _store(ctx, redis_url, prefix) as store:
        if unknown := known_breaker(store, name):
            raise CLIError(unknown)
        entries = recent_waits(store, name, limit)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    click.echo(waits_table(entries) if entries else f"no request has waited for {name!r} lately")


@main.command()
@click.argument("name")
@with_redis
@click.option(
    "--since",
    default=None,
    help="how far back: 30m, 2h, 1d, or an ISO time (default: the newest --count)",
)
@click.option("--count", type=click.IntRange(1, 1000), default=50, help="newest N (default 50)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def history(
    ctx: click.Context,
    name: str,
    redis_url: str | None,
    prefix: str | None,
    since: str | None,
    count: int,
    as_json: bool,
) -> None:
    """NAME's transitions and operators' commands, oldest first (times with their zone)."""
    start = _since(since)
    with _store(ctx, redis_url, prefix) as store:
        if unknown := known_breaker(store, name):
            raise CLIError(unknown)
        entries = CircuitBreaker(name, store=store).history(start, count)
    if as_json:
        click.echo(json.dumps([e.as_dict() for e in entries], indent=2))
        return
    click.echo(history_table(entries) if entries else f"nothing in {name!r}'s history yet")


def _since(text: str | None) -> float:
    """Epoch seconds from ``30m``, ``2h``, ``1d``, ``45s`` or an ISO time; 0 for None."""
    if not text:
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(text[:-1]) * units[text[-1]]
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise CLIError(f"--since takes 30m, 2h, 1d or an ISO time, got {text!r}", 2) from None
    if when.tzinfo is None:
        when = when.astimezone()  # the local zone, as the table shows times
    return when.timestamp()


def _operator() -> str:
    """Who gives a command from this shell: user@host (for the history)."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name to be had (a container without one)
        user = "?"
    return f"{user}@{socket.gethostname()}"


@main.command()
@click.argument("input", type=click.Path(dir_okay=False))
@click.option("--task", required=True, help="MODULE.TASK (workers.app.predict) or its name")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSONL output")
@click.option("--chunk", type=click.IntRange(1, 10_000), default=100, help="rows in flight")
@click.option("--queue", default=None, help="queue to send to (default: the task's)")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=3600.0)
@with_redis
def batch(**options: Any) -> None:
    """Run a JSONL file of inputs (an array or object a line) through a task, resumably."""
    from .batch import run_batch

    sys.exit(run_batch(**options))


@main.command()
@with_redis
@click.option("--port", type=click.IntRange(1, 65535), default=9108, help="port (default 9108)")
@click.option("--host", default="127.0.0.1", help="address to listen on")
@click.pass_context
def metrics(
    ctx: click.Context, redis_url: str | None, prefix: str | None, port: int, host: str
) -> None:
    """Serve Prometheus metrics of the breakers in Redis."""
    from .metrics import serve_store_metrics

    serve_store_metrics(_store(ctx, redis_url, prefix), port, host)
    click.echo(f"serving breaker metrics on http://{host}:{port}/metrics (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("demo_args", nargs=-1, type=click.UNPROCESSED)
def demo(demo_args: tuple[str, ...]) -> None:
    """The demo: predictions through the gateway and an outage (--help for its options)."""
    from .demo import main as run_demo

    sys.exit(run_demo(list(demo_args)))


#: ``celery -A proj cbtasks ...`` (the ``celery.commands`` entry point): the same verbs.
celery_command = click.Group(
    "cbtasks", commands=main.commands, help="See and steer cbtasks circuit breakers."
)


if __name__ == "__main__":
    main()
