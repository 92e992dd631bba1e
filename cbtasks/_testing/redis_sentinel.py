"""A real Sentinel set on 127.0.0.1: a master, a replica and three sentinels, for tests.

The sentinels watch the service ``mymaster`` and fail over within about two
seconds of losing the master (``down-after-milliseconds 1000``).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import redis

from .redis_server import RedisServer, RedisServerError, find_redis_server, free_port, terminate

SERVICE = "mymaster"


class RedisSentinelSet:
    """Master, replica and three sentinels; ``url`` is the redis+sentinel:// form."""

    def __init__(self, sentinels: int = 3) -> None:
        self.master = RedisServer()
        self.replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(self.master.port)))
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self._dir = tempfile.TemporaryDirectory(prefix="cbtasks-sentinel-")
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self, timeout: float = 30.0) -> RedisSentinelSet:
        self.master.start()
        self.replica.start()
        for port in self.sentinel_ports:
            config = Path(self._dir.name) / f"sentinel-{port}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self._dir.name}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 3000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self._sentinels.append(
                subprocess.Popen(
                    [find_redis_server(), str(config), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RedisServerError(f"the Sentinel set did not come up in {timeout}s")

    def master_port(self) -> int:
        """The port of the master the sentinels name now."""
        sentinel = redis.Redis(port=self.sentinel_ports[0], socket_timeout=1)
        host_port = sentinel.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)  # type: ignore[no-untyped-call, unused-ignore]
        return int(host_port[1])

    def _ready(self) -> bool:
        try:
            for port in self.sentinel_ports:
                sentinel = redis.Redis(port=port, socket_timeout=1)
                fields: dict[str, object] = sentinel.sentinel_master(SERVICE)  # type: ignore[assignment]
                if int(str(fields.get("num-other-sentinels", 0))) < len(self.sentinel_ports) - 1:
                    return False
                if int(str(fields.get("num-slaves", 0))) < 1:
                    return False
            return True
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        for process in self._sentinels:
            terminate(process, grace=5)
        self._sentinels.clear()
        self.replica.stop()
        self.master.stop()

    def __enter__(self) -> RedisSentinelSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._dir.cleanup()
        for server in (self.master, self.replica):
            server._dir.cleanup()
