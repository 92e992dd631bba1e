"""The reference model server: real predictions, fault injection, and no crash on bad input."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbtasks._testing.processes import ModelServer


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    """The real server, over HTTP."""
    with (
        ModelServer() as server,
        httpx.Client(base_url=server.url, timeout=10, headers=server.admin_headers) as http,
    ):
        yield http


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=20,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=json_values | st.fixed_dictionaries({"features": json_values}))
def test_any_json_gets_an_answer_or_a_422(client: httpx.Client, body: object) -> None:
    """Fuzzed bodies: a prediction or a 422 with a message, never a crash."""
    response = client.post("/predict", json=body)
    assert response.status_code in (200, 422), response.text
    if response.status_code == 422:
        assert response.json()["detail"]


def test_bytes_that_are_not_json_get_a_422(client: httpx.Client) -> None:
    """Not even JSON: 422."""
    response = client.post(
        "/predict", content=b"\xff\x00garbage", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


def test_faults_and_counts(client: httpx.Client) -> None:
    """Injected failures answer with the status and Retry-After asked for, and are counted."""
    client.delete("/admin/stats")
    client.put("/admin/faults", json={"error_rate": 1.0, "status_code": 429, "retry_after": 7})
    failed = client.post("/predict", json={"features": [5.1, 3.5, 1.4, 0.2]})
    assert failed.status_code == 429 and failed.headers["Retry-After"] == "7"
    client.delete("/admin/faults")
    ok = client.post("/predict", json={"features": [6.7, 3.0, 5.2, 2.3]})
    assert ok.status_code == 200 and ok.json()["label"] == "virginica"
    stats = client.get("/admin/stats").json()
    assert (stats["requests"], stats["ok"]) == (2, 1)


def test_bad_fault_settings_are_refused(client: httpx.Client) -> None:
    """The admin API validates too, and refuses a field it does not know: a misspelt fault
    would otherwise inject nothing while answering 200."""
    assert client.put("/admin/faults", json={"error_rate": 2}).status_code == 422
    assert client.put("/admin/faults", json={"status_code": 200}).status_code == 422
    misspelt = client.put("/admin/faults", json={"eror_rate": 1.0})
    assert misspelt.status_code == 422 and "eror_rate" in misspelt.text
    assert client.put("/admin/capacity", json={"concurency": 4}).status_code == 422
    assert client.put("/admin/capacity", json={"concurrency": 0}).status_code == 422


FEATURES = {"features": [5.1, 3.5, 1.4, 0.2]}


def test_capacity_serves_some_queues_some_and_refuses_the_rest(client: httpx.Client) -> None:
    """Capacity 2, queue 2, 400 ms a call, 7 callers at once: 2 served at once, 2 wait
    (about twice as long), 3 answered TGI's 429 "Model is overloaded" at once. (400 ms:
    the bounds below keep 200 ms from what a busy 2-core machine adds.)"""
    client.delete("/admin/stats")
    client.put("/admin/capacity", json={"concurrency": 2, "queue": 2, "service_ms": 400})
    try:

        def call() -> tuple[int, float, Any]:
            started = time.monotonic()
            response = client.post("/predict", json=FEATURES)
            return response.status_code, time.monotonic() - started, response.json()

        with concurrent.futures.ThreadPoolExecutor(7) as pool:
            answers = list(pool.map(lambda _: call(), range(7)))
    finally:
        client.delete("/admin/capacity")
    ok = sorted(seconds for status, seconds, _ in answers if status == 200)
    busy = [(seconds, body) for status, seconds, body in answers if status == 429]
    assert len(ok) == 4 and len(busy) == 3
    assert all(
        body == {"error": "Model is overloaded", "error_type": "overloaded"} for _, body in busy
    )
    assert all(seconds < 0.3 for seconds, _ in busy)
    assert ok[1] < 0.6 and ok[2] > 0.6  # two served at once (0.4 s), two after them (0.8 s)
    stats = client.get("/admin/stats").json()["phases"]["default"]
    assert (stats["peak_serving"], stats["overloaded"], stats["ok"]) == (2, 3, 4)


def test_capacity_answers_as_triton_and_changes_at_run_time(client: httpx.Client) -> None:
    """Triton's form: 503 "Exceeds maximum queue size"; capacity raised, the queue drains."""
    client.put(
        "/admin/capacity",
        json={"concurrency": 1, "queue": 0, "service_ms": 300, "overload": "triton"},
    )
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/predict", json=FEATURES)
            deadline = time.monotonic() + 5
            while client.get("/admin/capacity").json()["serving"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = client.post("/predict", json=FEATURES)
            assert refused.status_code == 503
            assert refused.json() == {"error": "Exceeds maximum queue size"}
            client.put("/admin/capacity", json={"concurrency": 2, "service_ms": 300})
            assert client.post("/predict", json=FEATURES).status_code == 200
            assert first.result().status_code == 200
    finally:
        client.delete("/admin/capacity")
    assert client.get("/admin/capacity").json()["concurrency"] is None


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("path", ["/predict", "/admin/faults"])
def test_numbers_json_cannot_hold_get_a_422(client: httpx.Client, path: str, number: str) -> None:
    """NaN, Infinity and 1e999 are the caller's mistake (a 422), never a 500."""
    body = (
        f'{{"features": [1, 2, {number}, 4]}}'
        if path == "/predict"
        else f'{{"latency_ms": {number}}}'
    )
    method = client.post if path == "/predict" else client.put
    response = method(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    client.delete("/admin/faults")


def test_a_body_past_the_limit_gets_a_413(client: httpx.Client) -> None:
    """Declared or streamed, a body over the limit is refused before it is read into memory."""
    big = b'{"features": [' + b"1," * 40_000 + b"1]}"
    declared = client.post("/predict", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:
        yield b'{"features": ['
        for _ in range(1000):
            yield b"1," * 100

    streamed = client.post(
        "/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert client.post("/predict", json={"features": [5.1, 3.5, 1.4, 0.2]}).status_code == 200


def test_the_admin_api_wants_the_token(client: httpx.Client) -> None:
    """Whoever reaches the model cannot inject faults or read counts without the token."""
    for token in (None, "Bearer wrong"):
        headers = {"Authorization": token} if token else {}
        with httpx.Client(base_url=str(client.base_url), timeout=10, headers=headers) as other:
            assert other.put("/admin/faults", json={"outage_seconds": 60}).status_code == 401
            assert other.get("/admin/stats").status_code == 401
    assert client.get("/admin/stats").status_code == 200
    assert client.post("/predict", json={"features": [5.1, 3.5, 1.4, 0.2]}).status_code == 200


def test_without_a_token_there_is_no_admin_api() -> None:
    """The server started without --admin-token serves predictions only."""
    import asyncio

    from cbtasks.server import create_app

    async def status(app: Any, path: str) -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as local:
            return (await local.get(path)).status_code

    assert asyncio.run(status(create_app(), "/admin/stats")) == 404
    assert asyncio.run(status(create_app(), "/healthz")) == 200
    assert asyncio.run(status(create_app(admin_token="t"), "/admin/stats")) == 401
