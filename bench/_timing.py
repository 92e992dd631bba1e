"""Median per-call times of interleaved variants, measured in one process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def per_call_samples(
    variants: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds per call of each variant in each of ``rounds`` interleaved rounds.

    Variants take turns within every round, so a noisy neighbour slows all
    of them alike and the ratios between them stay meaningful.
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            loop = range(calls)
            start = time.perf_counter()
            for _ in loop:
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    return samples


def median_ratio(samples: dict[str, list[float]], top: str, bottom: str) -> float:
    """Median over rounds of top/bottom: pairs runs made moments apart, so noise cancels."""
    return statistics.median(a / b for a, b in zip(samples[top], samples[bottom], strict=True))


def table(rows: Sequence[tuple[str, ...]]) -> str:
    """A plain text table with aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
