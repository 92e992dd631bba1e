"""More than one Redis: the URL forms, and a real 3-master Redis Cluster shared by processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cbtasks import BreakerPolicy, CircuitBreaker, CircuitOpenError, PolicyError, RedisStore, State
from cbtasks._testing.redis_cluster import RedisClusterServers
from cbtasks.stores._connection import describe_client, make_client
from cbtasks.stores._urls import parse_multi_node
from tests.conftest import wait_for
from tests.state_elsewhere import FEATURES, tasks_complete_once_through, worker_with_state_on


def test_the_url_forms_parse_as_written() -> None:
    cluster = parse_multi_node(
        "rediss+cluster://ops:p%40ss@10.0.0.1:7000,10.0.0.2:7001?ssl_cert_reqs=none"
    )
    assert (cluster.kind, cluster.tls, cluster.nodes) == (
        "cluster",
        True,
        (("10.0.0.1", 7000), ("10.0.0.2", 7001)),
    )
    assert (cluster.username, cluster.password, cluster.options) == (
        "ops",
        "p@ss",
        {"ssl_cert_reqs": "none"},
    )
    sentinel = parse_multi_node("redis+sentinel://:secret@s1:26379,s2:26380/mymaster/2")
    assert (sentinel.kind, sentinel.service, sentinel.db, sentinel.password) == (
        "sentinel",
        "mymaster",
        2,
        "secret",
    )
    assert parse_multi_node("redis+sentinel://s1:26379/mymaster").db == 0


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis+cluster://", "no host:port"),
        ("redis+cluster://10.0.0.1", "is not host:port"),
        ("redis+cluster://10.0.0.1:7000/3", "a cluster has no database"),
        ("redis+sentinel://s1:26379", "names the service"),
        ("redis+sentinel://s1:26379/mymaster/x", "must be a number"),
    ],
)
def test_bad_multi_node_urls_say_what_to_write(url: str, words: str) -> None:
    with pytest.raises(PolicyError, match=words):
        RedisStore(url)


def test_a_sentinel_url_makes_a_client_that_names_it_without_the_password() -> None:
    client = make_client("redis+sentinel://:secret@127.0.0.1:1,127.0.0.1:2/mymaster", 0.25)
    assert describe_client(client) == "redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster"
    store = RedisStore(client)
    assert "secret" not in repr(store)
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 0.25
    store.close()
    # A client the user made with Sentinel: the store's timeout and no retries apply to it.
    from redis.sentinel import Sentinel

    made = Sentinel([("127.0.0.1", 1)]).master_for("mymaster", socket_timeout=5)
    RedisStore(made, timeout=0.3).close()
    assert made.connection_pool.connection_kwargs["socket_timeout"] == 0.3
    assert made.get_retry().get_retries() == 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


def test_breakers_spread_over_the_nodes_and_processes_share_them(
    cluster: RedisClusterServers,
) -> None:
    policy = BreakerPolicy(failure_threshold=2, open_seconds=30)
    one, other = RedisStore(cluster.url), RedisStore(cluster.url)
    try:
        names = [f"spread-{i}" for i in range(6)]
        here = {name: CircuitBreaker(name, policy=policy, store=one) for name in names}
        there = {name: CircuitBreaker(name, policy=policy, store=other) for name in names}
        for name in names:
            there[name].call(lambda: None)  # the other process's view: closed
            for _ in range(2):
                with pytest.raises(ZeroDivisionError):
                    here[name].call(lambda: 1 / 0)
        nodes = {one.client.get_node_from_key(f"cbtasks:{{{name}}}:s").port for name in names}
        assert len(nodes) >= 2, "the test's breakers all live on one node"
        for name in names:  # the news reached the other process, from whichever node
            wait_for(lambda n=name: _rejects(there[n]), 10, f"news of {name}'s trip")
        assert set(names) <= set(other.names())
        here[names[0]].force_close()
        wait_for(lambda: there[names[0]].state is State.CLOSED, 10, "the close")
    finally:
        one.close()
        other.close()


def _rejects(breaker: CircuitBreaker) -> bool:
    try:
        breaker.call(lambda: None)
    except CircuitOpenError:
        return True
    return False


def test_a_ready_cluster_client_is_bounded_and_works(cluster: RedisClusterServers) -> None:
    from redis.cluster import ClusterNode, RedisCluster

    port = cluster.nodes[0].port
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", port)], socket_timeout=5)
    store = RedisStore(client, timeout=0.3)
    try:
        breaker = CircuitBreaker("ready-cluster", store=store)
        assert breaker.call(lambda: "through") == "through"
        pools = [
            n.redis_connection.connection_pool for n in client.get_nodes() if n.redis_connection
        ]
        assert pools and all(p.connection_kwargs["socket_timeout"] == 0.3 for p in pools)
    finally:
        store.close()


def test_the_cli_sees_every_breaker_on_every_node(cluster: RedisClusterServers) -> None:
    store = RedisStore(cluster.url)
    names = [f"cli-{i}" for i in range(6)]
    for name in names:
        CircuitBreaker(name, store=store).call(lambda: None)
    store.close()
    result = subprocess.run(
        [sys.executable, "-m", "cbtasks", "status", "--json", "--redis-url", cluster.url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert set(names) <= {row["name"] for row in json.loads(result.stdout)}


def test_the_metrics_collector_reads_every_node(cluster: RedisClusterServers) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from cbtasks.ops.metrics import BreakerCollector

    store = RedisStore(cluster.url)
    names = [f"metrics-{i}" for i in range(6)]
    for name in names:
        CircuitBreaker(name, store=store).call(lambda: None)
    registry = CollectorRegistry()
    registry.register(BreakerCollector(store))
    text = generate_latest(registry).decode()
    store.close()
    for name in names:
        assert f'cbtasks_breaker_state{{breaker="{name}",state="closed"}} 1.0' in text


def test_tasks_park_defer_and_complete_once_with_the_state_on_a_cluster(
    cluster: RedisClusterServers, tmp_path: Any
) -> None:
    """The breaker, the parking lot and the completion guard on the cluster; the broker apart."""
    with worker_with_state_on(cluster.url, tmp_path) as (app, model):
        store = RedisStore(cluster.url)
        try:
            breaker = CircuitBreaker("iris-model", store=store)
            breaker.force_open()
            model.reset_stats()
            sent = [
                app.send_task(name, (FEATURES,))
                for name in ("workers.predict", "workers.predict_parked") * 5
            ]
            wait_for(lambda: _parked(store) >= 5, 60, "five parked requests")
            breaker.force_close()
            answers = [result.get(timeout=120) for result in sent]
            assert all(answer["label"] == "setosa" for answer in answers)
            stats = model.stats()
            assert stats["requests"] == 10 and stats["calls_after_success"] == 0
        finally:
            store.close()


def _parked(store: RedisStore) -> int:
    from cbtasks.stores._parking import ParkingLot

    return ParkingLot(store.client, "cbtasks", "iris-model").count()


def test_a_node_lost_is_an_outage_of_its_breakers_only() -> None:
    """SIGKILL one master: its breakers follow on_error, the others go back to the shared
    state within a retry interval; no call raises, none waits long."""
    with RedisClusterServers() as servers:
        store = RedisStore(servers.url, retry_interval=0.2)
        breakers = {f"node-{i}": CircuitBreaker(f"node-{i}", store=store) for i in range(12)}
        for breaker in breakers.values():
            breaker.call(lambda: None)
        dead = servers.nodes[0]
        on_dead = {
            name
            for name in breakers
            if store.client.get_node_from_key(f"cbtasks:{{{name}}}:s").port == dead.port
        }
        assert on_dead and on_dead != set(breakers)
        dead.process.kill()
        dead.process.wait()
        worst = 0.0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for breaker in breakers.values():
                start = time.perf_counter()
                assert breaker.call(lambda: "answered") == "answered"
                worst = max(worst, time.perf_counter() - start)
            time.sleep(0.05)
        in_outage = {name for name, outage in store._outages.items() if outage.started}
        assert in_outage == on_dead
        assert store.outage.started is None  # no store-wide flag flipping every breaker
        assert worst < 1.0, f"a guarded call took {worst:.2f}s"
        store.close()


def test_a_whole_cluster_lost_is_an_outage_not_an_error() -> None:
    """Every master SIGKILLed: redis-py's topology refresh reaches no node and raises
    RedisClusterUnreachableError (a RedisClusterException, no RedisError); the breakers
    still follow on_error, no guarded call raises it."""
    with RedisClusterServers() as servers:
        store = RedisStore(servers.url, retry_interval=0.2)
        breakers = [CircuitBreaker(f"gone-{i}", store=store) for i in range(6)]
        for breaker in breakers:
            breaker.call(lambda: None)
        for node in servers.nodes:
            node.process.kill()
            node.process.wait()
        deadline = time.monotonic() + 2
        calls = 0
        while time.monotonic() < deadline:
            for breaker in breakers:
                assert breaker.call(lambda: "answered") == "answered"
                breaker._view.forget()  # ask the store every time: the path under test
                calls += 1
            time.sleep(0.02)
        assert calls and not store.available
        store.close()


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_tasks_complete_once_when_their_breakers_node_is_lost(tmp_path: Any, how: str) -> None:
    """Tasks flowing; the master holding their breaker SIGKILLed or SIGSTOPped (no replica,
    so no failover): every task completes, none calls the endpoint again after a success."""
    with (
        RedisClusterServers() as servers,
        worker_with_state_on(servers.url, tmp_path) as (app, model),
    ):
        store = RedisStore(servers.url)
        port = store.client.get_node_from_key("cbtasks:{iris-model}:s").port
        store.close()
        lost = next(node for node in servers.nodes if node.port == port)
        try:
            tasks_complete_once_through(app, model, lost.kill if how == "killed" else lost.freeze)
        finally:
            if how == "frozen":
                lost.thaw()


def test_an_asyncio_process_shares_the_cluster_circuit(cluster: RedisClusterServers) -> None:
    """AsyncRedisStore on the cluster URL: the same circuit as the blocking stores."""
    from cbtasks import AsyncRedisStore

    blocking = RedisStore(cluster.url)
    worker = CircuitBreaker(
        "async-cluster", policy=BreakerPolicy(failure_threshold=2), store=blocking
    )

    async def scenario() -> None:
        store = AsyncRedisStore(cluster.url)
        assert "redis+cluster://" in repr(store)
        breaker = CircuitBreaker(
            "async-cluster", policy=BreakerPolicy(failure_threshold=2), store=store
        )
        assert await breaker.acall(_answer) == "ok"
        for _ in range(2):
            with pytest.raises(ZeroDivisionError):
                await breaker.acall(_divide)
        await store.aclose()

    try:
        asyncio.run(scenario())
        assert worker.state is State.OPEN
    finally:
        blocking.close()


async def _answer() -> str:
    return "ok"


async def _divide() -> float:
    return 1 / 0


def test_a_plain_url_to_one_node_is_told_to_name_the_cluster(
    cluster: RedisClusterServers, caplog: pytest.LogCaptureFixture
) -> None:
    """One node's URL would see a third of the breakers: the CLI refuses, the store says why."""
    one_node = f"redis://127.0.0.1:{cluster.nodes[0].port}/0"
    result = subprocess.run(
        [sys.executable, "-m", "cbtasks", "status", "--redis-url", one_node],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "is a node of a Redis Cluster: use redis+cluster://" in result.stderr
    store = RedisStore(one_node)
    try:
        for i in range(12):  # some of these names live on another node: MOVED
            assert CircuitBreaker(f"moved-{i}", store=store).call(lambda: "answered") == "answered"
        assert "use redis+cluster://" in caplog.text
    finally:
        store.close()
