"""Start the reference model server and Celery workers as real processes."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from celery import Celery

from .redis_server import free_port, terminate

ROOT = Path(__file__).resolve().parents[2]


def client_app(broker_url: str, name: str = "cbtasks-client") -> Celery:
    """A Celery app of its own that sends tasks by name: JSON only, results in ``broker_url``."""
    app = Celery(name, broker=broker_url, backend=broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    return app


class ModelServer:
    """``python -m cbtasks.server`` on a free port, with its admin API at hand."""

    def __init__(self, port: int | None = None, grpc_port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: host:port of the gRPC service, when one is asked for (grpc_port=0: a free one).
        self.grpc_port = free_port() if grpc_port == 0 else grpc_port
        self.grpc_target = f"127.0.0.1:{self.grpc_port}" if self.grpc_port else None
        self.process: subprocess.Popen[bytes] | None = None
        #: The admin API's token: /admin answers only requests that bear it.
        self.admin_token = secrets.token_urlsafe(16)
        self.admin_headers = {"Authorization": f"Bearer {self.admin_token}"}
        self.admin = httpx.Client(base_url=self.url, timeout=10, headers=self.admin_headers)

    def start(self, timeout: float = 60.0) -> ModelServer:
        command = [sys.executable, "-m", "cbtasks.server", "--port", str(self.port)]
        if self.grpc_port:
            command += ["--grpc-port", str(self.grpc_port)]
        env = {**os.environ, "CBTASKS_ADMIN_TOKEN": self.admin_token}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"model server exited with {self.process.returncode}")
            try:
                # Its admin API with our token: only our own server says 200.
                if self.admin.get("/admin/stats").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"model server did not answer on port {self.port} in {timeout}s")

    def faults(self, **faults: Any) -> None:
        self.admin.put("/admin/faults", json=faults).raise_for_status()

    def clear_faults(self) -> None:
        self.admin.delete("/admin/faults").raise_for_status()

    def capacity(self, **capacity: Any) -> None:
        """Serve ``concurrency`` at once with a ``queue``, "overloaded" beyond (Capacity)."""
        self.admin.put("/admin/capacity", json=capacity).raise_for_status()

    def phase(self, name: str) -> None:
        self.admin.put("/admin/phase", json={"name": name}).raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = self.admin.get("/admin/stats")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def calls(self) -> list[tuple[float, float, int]]:
        """Each request answered since the stats were reset: (arrived at, seconds, status)."""
        response = self.admin.get("/admin/calls")
        response.raise_for_status()
        return [(float(t), float(d), int(s)) for t, d, s in response.json()]

    def arrivals(self) -> list[float]:
        """When each request answered since the stats were reset arrived (epoch seconds)."""
        return sorted(call[0] for call in self.calls())

    def reset_stats(self) -> None:
        self.admin.delete("/admin/stats").raise_for_status()

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
        self.process = None

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.admin.close()


class Gateway:
    """``uvicorn workers.gateway:app`` on a free port, with the given environment.

    ``command``, if given, replaces it: the port is appended (the benchmark's
    gateway with its loop-lag probe).
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path | None = None,
        command: list[str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.command = command
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Gateway:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        command = [
            sys.executable, "-m", "uvicorn", "workers.gateway:app",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
        ]  # fmt: skip
        if self.command is not None:
            command = [*self.command, str(self.port)]
        self.process = subprocess.Popen(
            command, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        if not isinstance(log, int):
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the gateway did not answer on port {self.port} in {timeout}s")

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
        self.process = None

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CeleryWorker:
    """``celery -A <app> worker`` as its own process group (prefork children included).

    ``app`` is the module holding the Celery app: ``workers.app`` (the example
    app), ``tests.worker_tasks`` or ``bench.baselines``.
    """

    def __init__(
        self,
        env: dict[str, str],
        *,
        concurrency: int = 4,
        queues: str | None = "celery",
        name: str = "w1",
        log_path: Path | None = None,
        app: str = "workers.app",
        prefetch_multiplier: int | None = None,
        pool: str = "prefork",
        cwd: Path = ROOT,
    ) -> None:
        #: Where it runs (the app module is imported from there).
        self.cwd = cwd
        self.env = {**os.environ, **env}
        self.app = app
        #: The execution pool: prefork, threads, gevent, eventlet or solo.
        self.pool = pool
        #: Messages each pool process may hold (the app's own setting when None).
        self.prefetch_multiplier = prefetch_multiplier
        self.concurrency = concurrency
        self.queues = queues
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CeleryWorker:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        prefetch = (
            [] if self.prefetch_multiplier is None
            else ["--prefetch-multiplier", str(self.prefetch_multiplier)]
        )  # fmt: skip
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", self.app, "worker",
                "-l", "warning", "-c", str(self.concurrency),
                *(["-Q", self.queues] if self.queues else []),
                "-n", f"{self.name}@%h", "-E", "--without-gossip", "--without-mingle",
                "--without-heartbeat", "-P", self.pool, *prefetch,
            ],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        if not isinstance(log, int):
            log.close()  # the worker has its own copy of the descriptor
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole worker: the main process and its pool children."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            if sig == signal.SIGKILL:
                self.process.wait()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


class Flower:
    """``celery -A workers.app flower`` on a free port, with basic auth."""

    def __init__(self, env: dict[str, str], user: str = "ops", password: str = "secret") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = (user, password)
        self.env = {**os.environ, **env}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, log_path: Path | None = None) -> Flower:
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "workers.app", "flower",
                f"--port={self.port}", "--address=127.0.0.1",
                f"--basic-auth={self.auth[0]}:{self.auth[1]}",
            ],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if not isinstance(log, int):
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower exited with {self.process.returncode}")
            try:
                httpx.get(f"{self.url}/healthcheck", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"flower did not answer on port {self.port} in {timeout}s")

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
        self.process = None
