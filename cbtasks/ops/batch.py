"""``cbtasks batch``: run a JSONL file of inputs through a Celery task, resumably.

Each input line is a JSON array (positional arguments) or object (keyword
arguments). Each output line is ``{"line": N, "status": "ok"|"fallback"|"failed",
"result": ..., "error": ...}``, written as rows finish. Rerunning with the same
output skips every line already in it, so an interrupted batch resumes where
it stopped and every input line appears in the output exactly once.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from kombu.exceptions import KombuError

from ..fallbacks import is_fallback
from ..task._headers import CHECK_COMPLETION
from ._progress import ProgressReport

# A dead broker is one clear line after a few seconds, not retries for half a minute.
_SEND_RETRIES = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


class BatchError(Exception):
    """A problem with the batch's arguments or files; printed as is."""


def load_task(path: str) -> Any:
    """``MODULE.TASK`` (``workers.app.predict``) or a registered name found in ``MODULE``.

    The working directory is on the import path, as for ``celery -A``: run
    from a project's root, its modules import.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise BatchError(f"--task must be MODULE.TASK (e.g. workers.app.predict), got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return _registered(path, str(exc))
    task = getattr(module, attribute, None)
    if task is None or not hasattr(task, "apply_async"):
        return _registered(path, f"{module_name!r} has no task {attribute!r}")
    return task


def _registered(name: str, why: str) -> Any:
    """A registered task name (``workers.predict``, what Flower shows), from its package's app."""
    package = name.split(".", 1)[0]
    for candidate in (f"{package}.app", f"{package}.celery", package):
        try:
            module = importlib.import_module(candidate)
        except ImportError:
            continue
        app = getattr(module, "app", None) or getattr(module, "celery", None)
        if app is not None and name in getattr(app, "tasks", {}):
            return app.tasks[name]
    raise BatchError(f"cannot find task {name!r}: {why}") from None


def done_lines(out: Path) -> set[int]:
    """Line numbers already in the output; drops a torn last line left by a crash."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    if raw and not raw.endswith(b"\n"):
        last = raw[raw.rfind(b"\n") + 1 :]
        try:
            json.loads(last)["line"]
        except (ValueError, KeyError, TypeError):
            raw = raw[: raw.rfind(b"\n") + 1]  # a line torn by a crash: written again
        else:
            raw += b"\n"  # a whole line without its newline: kept
        out.write_bytes(raw)
    try:
        text_lines = raw.decode().splitlines()
    except UnicodeDecodeError:
        raise BatchError(f"{out} is not a batch output file; use another --out") from None
    done = set()
    for number, text in enumerate(text_lines, 1):
        try:
            done.add(int(json.loads(text)["line"]))
        except (ValueError, KeyError, TypeError):
            raise BatchError(
                f"{out}:{number} is not a batch output line; use another --out or remove it"
            ) from None
    return done


def parse_row(text: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    try:
        row = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if isinstance(row, list):
        return tuple(row), {}
    if isinstance(row, dict):
        return (), row
    raise ValueError(f"expected a JSON array or object, got {type(row).__name__}")


class CircuitLine:
    """The task's circuit for the progress line, read from Redis at most once a second.

    While the circuit is open the progress sits still: this says why.
    """

    def __init__(self, task: Any, redis_url: str | None) -> None:
        self.name = getattr(task, "breaker", None) or task.name
        url = (
            redis_url
            or os.environ.get("CBTASKS_REDIS_URL")
            or task.app.conf.get("cbtasks_redis_url")
        )
        self.store: Any = None
        self.text = ""
        self._next = 0.0
        if url and hasattr(task, "cbtasks_breaker"):  # a CircuitBreakerTask
            from ..stores import RedisStore

            self.store = RedisStore(str(url), timeout=0.5)

    def describe(self) -> str:
        now = time.monotonic()
        if self.store is None or now < self._next:
            return self.text
        self._next = now + 1.0
        from .._errors import StoreError
        from ._fleet import OPERATOR_POLICY

        try:
            status = self.store.status(self.name, OPERATOR_POLICY)
        except StoreError:
            self.text = f"circuit {self.name}: Redis unreachable"
            return self.text
        if status is None or status.state.value == "closed":
            self.text = f"circuit {self.name}: closed"
        elif status.state.value == "open":
            self.text = (
                f"circuit {self.name}: OPEN, rows wait (probe in {status.retry_after:.0f} s)"
            )
            if status.mode.name == "FORCED_OPEN":
                self.text = f"circuit {self.name}: OPEN by an operator, rows wait"
        else:
            self.text = f"circuit {self.name}: half-open, probing"
        return self.text


def run_batch(
    *,
    input: str,
    out: str,
    task: str,
    chunk: int = 100,
    timeout: float = 3600.0,
    queue: str | None = None,
    redis_url: str | None = None,
    prefix: str | None = None,
) -> int:
    """``cbtasks batch``: the exit code (0 all ok, 1 some rows failed, 2 bad arguments)."""
    try:
        return _run(Path(input), Path(out), task, chunk, timeout, queue, redis_url)
    except BatchError as exc:
        print(f"cbtasks batch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ncbtasks batch: interrupted; rerun with the same --out ({out}) to resume "
            "(rows already sent keep their task ids: none is called twice)",
            file=sys.stderr,
        )
        return 130


def row_task_id(source: Path, number: int, text: str) -> str:
    """The same id for the same row of the same file: a resent row is absorbed by the
    completion guard instead of calling the endpoint again."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"cbtasks-batch:{source.resolve()}:{number}:{digest}")
    )


def _run(
    source: Path,
    out: Path,
    task_path: str,
    chunk: int,
    timeout: float,
    queue: str | None,
    redis_url: str | None = None,
) -> int:
    if not source.is_file():
        raise BatchError(f"no input file {source}")
    if out.exists() and out.resolve() == source.resolve():
        raise BatchError(f"--out {out} is the input file: name another file for the results")
    if not out.parent.is_dir():
        raise BatchError(f"--out {out}: no folder {out.parent}; create it first")
    if not 1 <= chunk <= 10_000:
        raise BatchError(f"--chunk must be 1 to 10000, got {chunk}")
    task = load_task(task_path)
    circuit = CircuitLine(task, redis_url)
    done = done_lines(out)
    lines = source.read_text().splitlines()
    todo = [(n, text) for n, text in enumerate(lines, 1) if n not in done and text.strip()]
    counts: Counter[str] = Counter()
    total = len(todo)
    if done:
        print(f"resuming: {len(done)} rows already in {out}", file=sys.stderr)
    report = ProgressReport(total)
    with out.open("a") as sink:
        in_flight: list[tuple[int, Any, float]] = []
        rows = iter(todo)
        finished = 0
        exhausted = False
        while in_flight or not exhausted:
            while not exhausted and len(in_flight) < chunk:
                item = next(rows, None)
                if item is None:
                    exhausted = True
                    break
                number, text = item
                try:
                    args, kwargs = parse_row(text)
                except ValueError as exc:
                    report.note(f"{source}:{number}: skipped, not a valid row: {exc}")
                    _write(sink, {"line": number, "status": "failed", "error": f"bad input: {exc}"})
                    counts["failed"] += 1
                    finished += 1
                    continue
                options: dict[str, Any] = {"queue": queue} if queue else {}
                options["task_id"] = row_task_id(source, number, text)
                # A resumed batch sends a row's task id again on purpose: the
                # completion guard looks, and a row that ran is not run again.
                options["headers"] = {CHECK_COMPLETION: True}
                try:
                    sent = task.apply_async(args, kwargs, retry_policy=_SEND_RETRIES, **options)
                except (KombuError, OSError) as exc:
                    raise BatchError(
                        f"cannot send row {number} to the broker "
                        f"({_broker_of(task)}): {type(exc).__name__}: {exc}; "
                        f"is it running? rerun with the same --out to resume"
                    ) from None
                except TypeError as exc:  # arguments the task does not take
                    _write(sink, {"line": number, "status": "failed", "error": f"bad input: {exc}"})
                    counts["failed"] += 1
                    finished += 1
                    continue
                in_flight.append((number, sent, time.monotonic()))
            still = []
            for number, result, since in in_flight:
                if not result.ready():
                    if time.monotonic() - since > timeout:
                        error = f"no answer in {timeout:g}s (is a worker consuming the queue?)"
                        _write(sink, {"line": number, "status": "failed", "error": error})
                        counts["failed"] += 1
                        finished += 1
                    else:
                        still.append((number, result, since))
                    continue
                _write(sink, _outcome(number, result, timeout))
                counts[_status(result)] += 1
                finished += 1
            in_flight = still
            report.update(finished, counts, circuit.describe())
            if in_flight:
                time.sleep(0.05)
    report.stop()
    print(
        f"done: {counts['ok']} ok, {counts['fallback']} fallback, {counts['failed']} failed "
        f"of {total} rows this run; {len(done) + finished} rows in {out}",
        file=sys.stderr,
    )
    return 1 if counts["failed"] else 0


def _status(result: Any) -> str:
    if not result.successful():
        return "failed"
    return "fallback" if is_fallback(result.result) else "ok"


def _outcome(number: int, result: Any, timeout: float) -> dict[str, Any]:
    status = _status(result)
    if status == "failed":
        return {
            "line": number,
            "status": status,
            "error": f"{type(result.result).__name__}: {result.result}",
        }
    return {"line": number, "status": status, "result": result.get(timeout=timeout)}


def _write(sink: TextIO, record: dict[str, Any]) -> None:
    sink.write(json.dumps(record) + "\n")
    sink.flush()  # a crash loses at most the row being written


def _broker_of(task: Any) -> str:
    from ..stores._connection import redact_url

    return redact_url(str(getattr(task.app.conf, "broker_url", None) or "the app's broker"))
