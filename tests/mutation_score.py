"""Print the score of the last ``make mutate`` run (mutmut's exported stats)."""

from __future__ import annotations

import json
from pathlib import Path


def main() -> None:
    stats = json.loads(Path("mutants/mutmut-cicd-stats.json").read_text())
    killed, total = stats["killed"], stats["total"]
    print(
        f"mutation score: {killed}/{total} killed ({100 * killed / max(total, 1):.1f}%), "
        f"{stats['survived']} survived, {stats['timeout']} timed out, "
        f"{stats['no_tests']} not reached by the fast tests"
    )


if __name__ == "__main__":
    main()
