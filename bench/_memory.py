"""Resident memory of a worker's process tree, sampled in a thread."""

from __future__ import annotations

import threading

import psutil


class MemoryWatch:
    """Resident memory of a worker's process tree, per process, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.baseline: dict[int, int] = {}
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[int, int]:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
            return {p.pid: p.memory_info().rss for p in procs if p.is_running()}
        except psutil.Error:
            return {}

    @property
    def peak(self) -> int:
        """The highest total seen."""
        return sum(self.peaks.values())

    @property
    def worst_growth(self) -> int:
        """The most any one process grew over its baseline."""
        return max(
            (peak - self.baseline.get(pid, peak) for pid, peak in self.peaks.items()), default=0
        )

    def start(self) -> MemoryWatch:
        self.baseline = self.sample()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for pid, rss in self.sample().items():
                self.peaks[pid] = max(self.peaks.get(pid, 0), rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
