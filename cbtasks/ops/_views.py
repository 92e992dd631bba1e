"""How the CLI shows breakers: rich tables on a terminal, plain aligned lines elsewhere.

A log or a pipe gets lines a script can split; a person at a terminal gets
rich's tables and its live view.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from ..stores import BreakerStatus
from ..stores._base import HistoryEntry
from ..stores._parking import ParkingLot

HEADER = (
    "NAME",
    "STATE",
    "MODE",
    "FAILURES",
    "TRIPS ROW/ALL",
    "OPEN UNTIL",
    "PROBES",
    "PARKED",
    "DEAD",
    "PAUSED",
    "LIMIT",
    "LAST FAILURE",
)
NO_BREAKERS = "no breakers yet (a breaker appears after its first call)"
_STYLE = {"closed": "green", "open": "bold red", "half_open": "yellow", "corrupt": "magenta"}


def as_dict(status: BreakerStatus, lot: ParkingLot, paused: int = 0) -> dict[str, Any]:
    """One breaker as plain data (``--json``)."""
    return {
        "name": status.name,
        "state": status.state.value,
        "mode": status.mode.name.lower(),
        "open_until": status.open_until,
        # Trips in a row (a close clears them; they set the backoff) and in all.
        "trips": status.trips,
        "trips_total": status.trips_total,
        "consecutive_failures": status.consecutive_failures,
        "window_calls": status.window_calls,
        "window_failures": status.window_failures,
        "probes_in_use": status.probes_in_use,
        "parked": lot.count(),
        # Parked requests that could not be released (poison), kept for an operator.
        "dead_letters": lot.dead_count(),
        # Workers that stopped consuming the breaker's queue (defer="pause").
        "paused_workers": paused,
        "limit": _limit_dict(status),
        # The last failure counted: why it opened, if it did.
        "last_failure": status.last_failure,
    }


def _limit_dict(status: BreakerStatus) -> dict[str, Any] | None:
    limit = status.limit
    if limit is None:
        return None
    return {
        "allows": limit.allows,
        "in_flight": limit.in_flight,
        "concurrency": limit.concurrency,
        "admitted_last_second": limit.admitted_last_second,
        "tokens_available": limit.tokens_available,
    }


def limit_cell(limit: dict[str, Any] | None) -> str:
    """What the limit lets through now: ``5/8 in flight, 48/s`` (an adaptive limit's
    concurrency to one decimal), tokens left under a budget; ``-`` without a limit."""
    if not limit:
        return "-"
    parts = []
    concurrency = limit.get("concurrency")
    if concurrency is not None:
        shown = f"{concurrency:g}" if float(concurrency).is_integer() else f"{concurrency:.1f}"
        parts.append(f"{limit['in_flight']}/{shown} in flight")
    parts.append(f"{limit['admitted_last_second']}/s")
    if limit.get("tokens_available") is not None:
        parts.append(f"{limit['tokens_available']} tokens left")
    return ", ".join(parts)


def cells(row: dict[str, Any]) -> tuple[str, ...]:
    """A row's cells, in HEADER's order."""
    if row["state"] == "corrupt":
        return (row["name"], "corrupt", *("-" * (len(HEADER) - 2)))
    return (
        row["name"],
        row["state"],
        row["mode"],
        # Failures are counted while closed; an open circuit counts none.
        str(row["consecutive_failures"]) if row["state"] == "closed" else "-",
        f"{row['trips']}/{row.get('trips_total', row['trips'])}",
        _open_until(row),
        str(row["probes_in_use"]),
        str(row["parked"]),
        str(row["dead_letters"]),
        str(row.get("paused_workers", 0)),
        limit_cell(row.get("limit")),
        _short(row.get("last_failure")),
    )


def plain_table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns without decoration: for logs, pipes and scripts."""
    if not rows:
        return NO_BREAKERS
    lines = [HEADER, *(cells(row) for row in rows)]
    return aligned(lines)


def rich_table(rows: list[dict[str, Any]], title: str | None = None) -> Any:
    """The same table for a terminal, states in colour."""
    from rich import box
    from rich.table import Table

    if not rows:
        return NO_BREAKERS
    table = Table(*HEADER, box=box.SIMPLE_HEAD, title=title, title_justify="left")
    for row in rows:
        values = cells(row)
        style = _STYLE.get(row["state"], "")
        table.add_row(values[0], f"[{style}]{values[1]}[/]" if style else values[1], *values[2:])
    return table


def _short(text: str | None, most: int = 48) -> str:
    if not text:
        return "-"
    return text if len(text) <= most else text[: most - 3] + "..."


def _open_until(row: dict[str, Any]) -> str:
    if row["mode"] == "forced_open":
        return "until closed"  # an operator's open has no end of its own
    until = row["open_until"]
    if not until:
        return "-"
    at = datetime.datetime.fromtimestamp(until).astimezone()
    # The date too when it is not today's (a long backoff, a clock far away).
    shown = at.strftime("%H:%M:%S" if at.date() == datetime.date.today() else "%Y-%m-%d %H:%M:%S")
    return f"{shown} {_zone()}"


def history_table(entries: Sequence[HistoryEntry]) -> str:
    """A breaker's history, oldest first, times in the local zone with its name."""
    header = ("AT", "CHANGE", "WHY", "COMMAND", "BY")
    lines = [header]
    for e in entries:
        at = datetime.datetime.fromtimestamp(e.at).astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")
        change = f"{e.from_state} -> {e.to_state}" if e.to_state else f"({e.state})"
        why = "; ".join(x for x in (e.reason, e.failure, e.why) if x)
        lines.append((f"{at[:-3]} {_zone()}", change, why or "-", e.command or "-", e.by or "-"))
    return aligned(lines)


def _zone() -> str:
    return datetime.datetime.now().astimezone().strftime("%Z") or "local"


def waits_table(entries: list[dict[str, Any]]) -> str:
    """Requests that waited for a circuit, newest first (``cbtasks waited``)."""
    header = ("TASK ID", "TASK", "DEFERRALS", "WAITED", "MODE", "RAN AT", "WHY")
    lines = [header]
    for e in entries:
        ran = datetime.datetime.fromtimestamp(float(e.get("ran_at", 0))).strftime("%H:%M:%S")
        waited = f"{float(e.get('waited_seconds', 0)):.1f}s"
        lines.append(
            (str(e.get("task_id")), str(e.get("task")), str(e.get("deferrals")), waited,
             str(e.get("mode")), ran, str(e.get("reason")))
        )  # fmt: skip
    return aligned(lines)


def aligned(lines: Sequence[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell, two spaces apart: what a script can split."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
