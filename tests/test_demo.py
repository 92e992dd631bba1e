"""`make demo` runs to its summary, and says so with every call accounted for."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_an_outage_to_its_summary() -> None:
    """A short schedule: the breaker trips, recovers, and nothing is lost."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbtasks.demo",
            "--processes",
            "2",
            "--seconds",
            "5",
            "--outage",
            "1.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "closed -> open" in out and "half_open -> closed" in out
    accounted = re.search(r"accounted for: (\d+) of (\d+) calls, lost: 0", out)
    assert accounted and accounted.group(1) == accounted.group(2) and int(accounted.group(1)) > 0
    during = re.search(r"endpoint calls during the outage: (\d+)", out)
    short = re.search(r"short_circuited\s+(\d+)", out)
    assert during and short and int(short.group(1)) > int(during.group(1))


def test_demo_rejects_bad_arguments() -> None:
    """Bad CLI arguments get a clear message and exit code 2."""
    result = subprocess.run(
        [sys.executable, "-m", "cbtasks.demo", "--outage", "500"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--outage must be" in result.stderr
