"""A batch's progress: rich's progress bar on a terminal, a plain line now and then elsewhere.

A log gets one line a second at most, and only when something changed, not
a carriage-return line that turns into one endless line.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any, TextIO


class ProgressReport:
    """Rows finished out of ``total``, their outcomes, and the task's circuit."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self._last = ""
        self._next_line = 0.0
        self._bar: Any = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("batch"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TextColumn("{task.fields[circuit]}"),
                console=Console(file=self.stream),
            )
            self._bar.start()
            self._row = self._bar.add_task("batch", total=total, counts="", circuit="")

    def update(self, finished: int, counts: Counter[str], circuit: str) -> None:
        outcomes = f"ok {counts['ok']}  fallback {counts['fallback']}  failed {counts['failed']}"
        if self._bar is not None:
            self._bar.update(self._row, completed=finished, counts=outcomes, circuit=circuit)
            return
        line = f"{finished}/{self.total}  {outcomes}" + (f"  {circuit}" if circuit else "")
        now = time.monotonic()
        if line != self._last and (now >= self._next_line or finished == self.total):
            print(line, file=self.stream, flush=True)
            self._last, self._next_line = line, now + 1.0

    def note(self, message: str) -> None:
        """A line of its own (a skipped row), above the bar on a terminal."""
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.stream, flush=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
