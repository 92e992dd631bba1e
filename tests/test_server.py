"""The reference model server: real predictions, fault injection, and no crash on bad input."""

from __future__ import annotations

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
    """The admin API validates too."""
    assert client.put("/admin/faults", json={"error_rate": 2}).status_code == 422
    assert client.put("/admin/faults", json={"status_code": 200}).status_code == 422


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
