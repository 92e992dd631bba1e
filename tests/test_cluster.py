"""Cluster-wide invariants: 8 processes share one RedisStore breaker through an outage."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import time

import redis

from cbtasks import BreakerPolicy, CircuitBreaker, CircuitOpenError, Outcome, RedisStore
from tests.conftest import wait_for

PROCESSES = 8
POLICY = BreakerPolicy(
    failure_threshold=5, open_seconds=0.3, half_open_probes=2, probe_lease_seconds=5
)
# Seconds after the common start: the endpoint fails in [OUTAGE_FROM, OUTAGE_TO).
OUTAGE_FROM, OUTAGE_TO, RUN_FOR = 0.5, 2.5, 4.0

# Counts probes in flight and keeps the highest count seen, atomically.
_PROBE_IN = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


def _worker(url: str, name: str, index: int) -> None:
    client = redis.Redis.from_url(url)
    probe_in = client.register_script(_PROBE_IN)
    store = RedisStore(url)
    events: list[dict[str, object]] = []
    breaker = CircuitBreaker(
        name,
        policy=POLICY,
        store=store,
        listeners=[lambda e: events.append({"from": e.from_state, "to": e.to_state, "at": e.at})],
    )
    client.incr("test:ready")
    deadline = time.time() + 60
    while client.get("test:go") is None and time.time() < deadline:
        time.sleep(0.005)
    start = float(client.get("test:go") or 0)
    late_successes = 0
    endpoint_calls = 0
    while (now := time.time()) < start + RUN_FOR:
        try:
            probe = breaker.admit()
        except CircuitOpenError:
            time.sleep(0.002)
            continue
        if probe:
            probe_in(keys=["test:probes", "test:max_probes"])
        endpoint_calls += 1
        failed = start + OUTAGE_FROM <= now < start + OUTAGE_TO
        time.sleep(0.003)  # the endpoint's work
        if probe:
            client.decr("test:probes")
        breaker.record(probe, Outcome.FAILURE if failed else Outcome.SUCCESS)
        if now > start + RUN_FOR - 0.5 and not failed:
            late_successes += 1
    client.rpush(
        "test:results",
        json.dumps({"index": index, "events": events, "late_successes": late_successes}),
    )
    store.close()


def test_eight_processes_share_one_breaker_through_an_outage(redis_url: str) -> None:
    """Never more probes than allowed, one open transition per trip, all recover."""
    client = redis.Redis.from_url(redis_url)
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=_worker, args=(redis_url, "shared-model", i)) for i in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: int(client.get("test:ready") or 0) == PROCESSES, 60, "workers ready")
        client.set("test:go", time.time() + 0.2)
        wait_for(lambda: client.llen("test:results") == PROCESSES, 60, "workers done")
    finally:
        for worker in workers:
            worker.join(10)
    results = [json.loads(r) for r in client.lrange("test:results", 0, -1)]

    assert int(client.get("test:max_probes") or 0) <= POLICY.half_open_probes
    transitions = sorted((e["at"], e["from"], e["to"]) for r in results for e in r["events"])
    kinds = [(f, t) for _, f, t in transitions]
    assert kinds.count(("closed", "open")) == 1, transitions
    assert kinds.count(("half_open", "closed")) == 1, transitions
    assert kinds.count(("open", "half_open")) == kinds.count(("half_open", "open")) + 1
    # The transitions form one chain: each starts where the one before ended.
    assert all(a[1] == b[0] for a, b in itertools.pairwise(kinds)), transitions
    assert all(r["late_successes"] > 0 for r in results), "a process never admitted calls again"
