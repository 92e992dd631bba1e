"""Run every benchmark and print its figures: ``python -m bench`` (or ``make bench``)."""

from __future__ import annotations

import platform
import sys

from bench import adaptive, ceiling, gateway, limits, outage, overhead, redis_cost, scale


def main() -> None:
    print(f"# cbtasks benchmarks on {platform.machine()}, Python {sys.version.split()[0]}")
    print("\n## Redis commands sent per guarded call (bench/redis_cost.py)\n")
    redis_cost.main([])
    print("\n## Cost of a guarded call, median of interleaved rounds (bench/overhead.py)\n")
    overhead.main([])
    print("\n## Redis commands per second for a fleet (bench/scale.py)\n")
    scale.main([])
    print("\n## The ceiling of one Redis and of a 3-master cluster (bench/ceiling.py)\n")
    ceiling.main([])
    print("\n## The gateway: latency, throughput, loop lag (bench/gateway.py)\n")
    gateway.main([])
    print()
    limits.main([])
    print("\n## The adaptive limit against a server of unknown capacity (bench/adaptive.py)\n")
    adaptive.main([])
    print("\n## Outage storm and parked backlog (bench/outage.py; about 25 minutes)\n")
    outage.main(["--backlog", "10000"])


if __name__ == "__main__":
    main()
