"""A worker whose breaker state lives on another Redis (a cluster, a Sentinel set)
than its broker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from celery import Celery

from cbtasks._testing.processes import CeleryWorker, ModelServer, client_app
from cbtasks._testing.redis_server import RedisServer
from tests.conftest import wait_for

FEATURES = [5.1, 3.5, 1.4, 0.2]


@contextmanager
def worker_with_state_on(state_url: str, tmp_path: Path) -> Iterator[tuple[Celery, ModelServer]]:
    """A worker, its own broker and a model server; yields once a first task has answered."""
    with RedisServer() as broker, ModelServer() as model:
        env = {
            "CBTASKS_REDIS_URL": state_url,
            "CBTASKS_BROKER_URL": broker.url,
            "CBTASKS_RESULT_URL": broker.url,
            "CBTASKS_MODEL_URL": model.url,
        }
        worker = CeleryWorker(env, concurrency=2, log_path=tmp_path / "worker.log").start()
        try:
            app = client_app(broker.url)
            first = app.send_task("workers.predict", (FEATURES,)).get(timeout=60)
            assert first["label"] == "setosa"
            yield app, model
        finally:
            worker.stop()


def tasks_complete_once_through(app: Celery, model: ModelServer, lose: Callable[[], None]) -> None:
    """60 tasks flowing, ``lose()`` the state's server mid-traffic: every task completes,
    none calls the endpoint again after a success."""
    model.faults(latency_ms=50)
    model.reset_stats()
    sent = [app.send_task("workers.predict", (FEATURES,)) for _ in range(60)]
    wait_for(lambda: model.stats()["requests"] >= 10, 60, "traffic")
    lose()
    answers = [result.get(timeout=120) for result in sent]
    assert all(answer["label"] == "setosa" for answer in answers)
    stats = model.stats()
    assert stats["calls_after_success"] == 0, stats
    assert stats["ok"] >= 60
