"""The FastAPI gateway (uvicorn workers.gateway:app) in front of real workers, Redis and model."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cbtasks import BreakerPolicy, CircuitBreaker, RedisStore
from cbtasks._testing.processes import CeleryWorker, Gateway, ModelServer
from cbtasks._testing.redis_server import RedisServer
from cbtasks.fallbacks import MARK
from tests.conftest import wait_for

FEATURES = [5.1, 3.5, 1.4, 0.2]
# The example app's policy (workers/app.py): the breaker that trips decides the open period.
WORKERS_POLICY = BreakerPolicy(failure_threshold=5, open_seconds=2.0, half_open_probes=2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Redis, the model server, a worker of the example app, and two gateways."""
    logs = tmp_path_factory.mktemp("gateway-logs")
    with RedisServer() as redis_server, ModelServer() as model:
        env = {"CBTASKS_REDIS_URL": redis_server.url, "CBTASKS_MODEL_URL": model.url}
        worker = CeleryWorker(env, concurrency=2, log_path=logs / "worker.log").start()
        store = RedisStore(redis_server.url)
        try:
            with (
                Gateway(env, log_path=logs / "gateway.log") as with_fallback,
                Gateway(
                    {**env, "CBTASKS_GATEWAY_FALLBACK": "none"}, log_path=logs / "plain.log"
                ) as plain,
            ):
                yield {
                    "model": model,
                    "redis": redis_server,
                    "breaker": CircuitBreaker("iris-model", policy=WORKERS_POLICY, store=store),
                    "gateway": with_fallback.url,
                    "plain": plain.url,
                }
        finally:
            worker.stop()
            store.close()


@pytest.fixture
def stack_reset(stack: dict[str, Any]) -> dict[str, Any]:
    stack["model"].clear_faults()
    stack["breaker"].reset()
    return stack


def post(url: str, body: Any, wait: float = 5.0, **kwargs: Any) -> httpx.Response:
    async def send() -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await client.post("/predict", params={"wait": wait}, json=body, **kwargs)

    return asyncio.run(send())


def task_state(url: str, task_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/tasks/{task_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_a_prediction_while_closed(stack_reset: dict[str, Any]) -> None:
    response = post(stack_reset["gateway"], {"features": FEATURES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "SUCCESS" and body["result"]["label"] == "setosa"
    assert task_state(stack_reset["gateway"], body["task_id"])["result"] == body["result"]


def test_not_done_in_time_is_a_202_and_the_task_can_be_followed(
    stack_reset: dict[str, Any],
) -> None:
    stack_reset["model"].faults(latency_ms=1500)
    response = post(stack_reset["gateway"], {"features": FEATURES}, wait=0.2)
    assert response.status_code == 202, response.text
    task_id = response.json()["task_id"]
    assert response.json()["state"] in {"PENDING", "STARTED"}
    wait_for(lambda: task_state(stack_reset["gateway"], task_id)["state"] == "SUCCESS", 30)


def test_open_circuit_answers_the_fallback_at_once_and_queues_the_request(
    stack_reset: dict[str, Any],
) -> None:
    breaker = stack_reset["breaker"]
    breaker.force_open()
    start = time.monotonic()
    response = post(stack_reset["gateway"], {"features": FEATURES}, wait=10)
    assert time.monotonic() - start < 5, "the gateway waited for a result that could not come"
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "FALLBACK"
    assert body["result"][MARK] == "default"
    task_id = body["task_id"]
    # Queued for later: deferred meanwhile, and the real prediction once the circuit closes.
    wait_for(lambda: task_state(stack_reset["gateway"], task_id)["state"] == "CIRCUIT_OPEN", 30)
    deferred = task_state(stack_reset["gateway"], task_id)
    assert deferred["breaker"] == "iris-model" and "forced open" in deferred["reason"]
    breaker.force_close()
    wait_for(lambda: task_state(stack_reset["gateway"], task_id)["state"] == "SUCCESS", 60)
    assert task_state(stack_reset["gateway"], task_id)["result"]["label"] == "setosa"


def test_open_circuit_without_fallback_is_a_202_with_retry_after(
    stack_reset: dict[str, Any],
) -> None:
    breaker = stack_reset["breaker"]
    for _ in range(5):  # trip it as the workers would
        breaker.record(breaker.admit(), breaker.classify(RuntimeError("503")))
    start = time.monotonic()
    response = post(stack_reset["plain"], {"features": FEATURES}, wait=10)
    assert time.monotonic() - start < 5
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "CIRCUIT_OPEN" and 0 < body["retry_after"] <= 2.0
    # The circuit probes after its open period; the queued request is then served.
    wait_for(lambda: task_state(stack_reset["plain"], body["task_id"])["state"] == "SUCCESS", 60)


def test_bad_requests_get_clear_errors(stack_reset: dict[str, Any]) -> None:
    url = stack_reset["gateway"]
    for body in ({"features": [1, 2, 3]}, {"features": ["1", 2, 3, 4]}, {"x": 1}, [1, 2]):
        response = post(url, body)
        assert response.status_code == 422, (body, response.text)
        assert "detail" in response.json()
    response = post(url, {"features": FEATURES}, wait=-1)
    assert response.status_code == 422 and "wait" in response.text
    response = post(url, None, content=b"{" + b" " * 100_000 + b"}")
    assert response.status_code == 413
    response = post(url, None, content=b'{"features": [NaN, 1, 2, 3]}')
    assert response.status_code == 422
    assert httpx.get(f"{url}/tasks/bad%20id", timeout=10).status_code == 422
    assert task_state(url, "never-sent")["state"] == "PENDING"


def test_redis_gone_is_a_503_that_says_so(tmp_path: Any) -> None:
    with RedisServer() as redis_server:
        env = {"CBTASKS_REDIS_URL": redis_server.url, "CBTASKS_MODEL_URL": "http://127.0.0.1:9"}
        with Gateway(env, log_path=tmp_path / "gateway.log") as gateway:
            assert httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200
            redis_server.stop()  # the broker too: nothing can be queued
            ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
            assert ready.status_code == 503 and "cannot reach the broker" in ready.text
            assert httpx.get(f"{gateway.url}/livez", timeout=10).status_code == 200
            response = post(gateway.url, {"features": FEATURES})
            assert response.status_code == 503, response.text
            assert "cannot reach the broker" in response.json()["detail"]


def test_a_frozen_breaker_redis_keeps_the_gateway_ready(tmp_path: Any) -> None:
    """/healthz used to answer 503 while the breaker's Redis was frozen, though /predict
    still queued requests: Kubernetes would have pulled a pod that serves. Readiness now
    fails only when nothing can be queued; liveness only when the process is gone."""
    with RedisServer() as broker, RedisServer() as breaker_redis:
        env = {
            "CBTASKS_BROKER_URL": broker.url,
            "CBTASKS_REDIS_URL": breaker_redis.url,
            "CBTASKS_MODEL_URL": "http://127.0.0.1:9",
        }
        with Gateway(env, log_path=tmp_path / "gateway.log") as gateway:
            ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
            assert ready.status_code == 200 and ready.json()["breaker_state"] == "reachable"
            breaker_redis.freeze()
            try:
                ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
                assert ready.status_code == 200, ready.text
                assert ready.json()["breaker_state"].startswith("unreachable")
                assert httpx.get(f"{gateway.url}/livez", timeout=10).status_code == 200
                response = post(gateway.url, {"features": FEATURES}, wait=0)
                assert response.status_code == 202, response.text
            finally:
                breaker_redis.thaw()


USER_APP = """
import os

from celery import Celery
from pydantic import BaseModel

from cbtasks import CircuitBreakerTask
from cbtasks.gateway import create_gateway

URL = os.environ["CBTASKS_REDIS_URL"]
app = Celery("userapp", broker=URL, backend=URL)
app.conf.update(cbtasks_redis_url=URL, task_serializer="json", accept_content=["json"],
                result_serializer="json")


@app.task(base=CircuitBreakerTask, bind=True, breaker="summarizer", name="userapp.summarize")
def summarize(self, text: str, max_words: int = 3) -> dict:
    return {"summary": " ".join(text.split()[:max_words])}


class Summarize(BaseModel):
    text: str
    max_words: int = 3


gateway = create_gateway(summarize, body=Summarize, path="/summarize")
"""


def test_the_gateway_serves_a_task_of_another_shape_from_outside_the_repository(
    tmp_path: Any,
) -> None:
    """cbtasks.gateway, from a project of one's own (not this repository): the body is the
    task's own (a pydantic model), its fields the task's keyword arguments."""
    (tmp_path / "userapp.py").write_text(USER_APP)
    with RedisServer() as redis_server:
        env = {"CBTASKS_REDIS_URL": redis_server.url, "PYTHONPATH": ""}
        worker = CeleryWorker(
            env, concurrency=1, app="userapp", cwd=tmp_path, log_path=tmp_path / "worker.log"
        ).start()
        command = [sys.executable, "-m", "uvicorn", "userapp:gateway", "--port"]
        try:
            with Gateway(
                env, log_path=tmp_path / "gateway.log", command=command, cwd=tmp_path
            ) as gateway:
                ok = httpx.post(
                    f"{gateway.url}/summarize?wait=20",
                    json={"text": "the model is back up now", "max_words": 2},
                    timeout=30,
                )
                assert ok.status_code == 200, ok.text
                assert ok.json()["result"] == {"summary": "the model"}
                bad = httpx.post(f"{gateway.url}/summarize", json={"txt": "typo"}, timeout=30)
                assert bad.status_code == 422 and "typo" not in bad.text
        finally:
            worker.stop()
