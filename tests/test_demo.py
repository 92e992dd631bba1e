"""`make demo` runs to its summary, and says so with every call accounted for."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_an_outage_to_its_summary() -> None:
    """A short batch through the gateway, Celery and HTTP: the breaker trips, the gateway
    answers with its fallback meanwhile, all recover, nothing is lost."""
    result = subprocess.run(
        [sys.executable, "-m", "cbtasks.ops.demo", "--tasks", "120", "--outage", "3"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "breaker closed -> open" in out and "-> closed" in out
    accounted = re.search(r"accounted for: (\d+) of (\d+) requests, lost: 0", out)
    assert accounted and accounted.group(1) == accounted.group(2) == "120"
    assert re.search(r"called again after success +0\n", out)
    assert re.search(r"failed +0\n", out)
    assert "\r" not in out  # not a terminal: lines, not one carriage-return line
    # Requests, not events: no more deferred than sent, and fewer than the deferrals.
    deferred = re.search(r"deferred at least once +(\d+) requests \((\d+) deferrals in all\)", out)
    assert deferred and 0 < int(deferred.group(1)) <= 120
    assert int(deferred.group(1)) <= int(deferred.group(2))
    model = re.search(r"answered by the model +(\d+)\n", out)
    fallback = re.search(r"answered by a fallback +(\d+) \(in the task\)", out)
    assert model and fallback and int(model.group(1)) + int(fallback.group(1)) == 120
    gateway = re.search(r"the gateway's fallback +(\d+) requests answered at once", out)
    assert gateway and int(gateway.group(1)) > 0


def test_demo_rejects_bad_arguments() -> None:
    """Bad CLI arguments get a clear message and exit code 2."""
    result = subprocess.run(
        [sys.executable, "-m", "cbtasks.ops.demo", "--outage", "500"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--outage must be" in result.stderr
