"""The HTTP model client: answers mapped to outcomes, on the real server and MockTransport."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cbtasks import CallerError, CircuitBreaker, EndpointFailure, State
from cbtasks._testing.processes import ModelServer
from cbtasks._testing.redis_server import free_port
from cbtasks.clients import HTTPModelClient
from cbtasks.clients.http import parse_retry_after

FEATURES = {"features": [5.1, 3.5, 1.4, 0.2]}


def predict(url: str, payload: dict[str, Any], **options: Any) -> dict[str, Any]:
    """One call through a client that is closed afterwards."""
    timeout = options.pop("timeout", 10.0)
    transport = options.pop("transport", None)
    with HTTPModelClient(url, timeout=timeout, transport=transport) as client:
        return client.predict(payload, **options)


@pytest.fixture(scope="module")
def server() -> Iterator[ModelServer]:
    with ModelServer() as model:
        yield model


@pytest.fixture
def model(server: ModelServer) -> ModelServer:
    server.clear_faults()
    return server


def test_prediction_from_the_real_model(model: ModelServer) -> None:
    """A good request gets the model's answer."""
    answer = predict(model.url, FEATURES)
    assert answer["label"] == "setosa" and len(answer["probabilities"]) == 3


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_server_errors_are_endpoint_failures(model: ModelServer, status: int) -> None:
    """5xx and 429 count against the breaker, with the status kept."""
    model.faults(error_rate=1.0, status_code=status)
    with pytest.raises(EndpointFailure) as info:
        predict(model.url, FEATURES)
    assert info.value.status == status


def test_retry_after_is_read(model: ModelServer) -> None:
    """A 503 with Retry-After keeps the circuit open at least that long."""
    model.faults(error_rate=1.0, status_code=503, retry_after=30)
    breaker = CircuitBreaker(fail_max=5)
    with pytest.raises(EndpointFailure) as info:
        breaker.call(predict, model.url, FEATURES)
    assert info.value.retry_after == 30
    assert breaker.state is State.OPEN


def test_invalid_input_is_the_callers_error(model: ModelServer) -> None:
    """A 422 from the server raises CallerError, which the breaker ignores."""
    breaker = CircuitBreaker(fail_max=1)
    with pytest.raises(CallerError) as info:
        breaker.call(predict, model.url, {"features": [1, 2]})
    assert info.value.status == 422
    assert breaker.state is State.CLOSED


def test_timeouts_are_endpoint_failures(model: ModelServer) -> None:
    """A call slower than the client's timeout fails the endpoint."""
    model.faults(latency_ms=2000)
    with pytest.raises(EndpointFailure, match="timed out"):
        predict(model.url, FEATURES, timeout=0.2)


def test_refused_connections_are_endpoint_failures() -> None:
    """Nothing listening: an endpoint failure naming where it tried."""
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EndpointFailure, match="cannot reach"):
        predict(url, FEATURES)


def test_a_body_that_is_not_json_is_an_endpoint_failure() -> None:
    """A 200 whose body is not JSON is the endpoint's fault (a proxy's error page, say)."""
    transport = httpx.MockTransport(
        lambda request: httpx.Response(
            200, content=b"<html>oops</html>", headers={"content-type": "text/html"}
        )
    )
    with pytest.raises(EndpointFailure, match="not JSON"):
        predict("http://model", FEATURES, transport=transport)


@pytest.mark.parametrize("answer", [[1, 2], "a string", 3.5, False, {"label": "x"}])
def test_any_json_answer_is_returned(answer: Any) -> None:
    """BentoML and TorchServe answer arrays and strings: any JSON value is an answer."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=answer))
    assert predict("http://model", [5.1, 3.5], transport=transport) == answer


def test_request_id_travels_as_a_header() -> None:
    """The task id reaches the server, which counts duplicate executions by it."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("X-Request-ID"))
        return httpx.Response(200, json={"label": "x"})

    predict("http://model", FEATURES, transport=httpx.MockTransport(handler), request_id="task-1")
    assert seen == ["task-1"]


@pytest.mark.parametrize(
    ("value", "seconds"), [("30", 30.0), ("0", 0.0), ("soon", None), (None, None), ("-5", 0.0)]
)
def test_retry_after_values(value: str | None, seconds: float | None) -> None:
    """Seconds or an HTTP date; anything else is ignored."""
    assert parse_retry_after(value) == seconds


def test_http_date_retry_after() -> None:
    """An HTTP date in the future gives the seconds until then."""
    assert 0 < parse_retry_after("Wed, 21 Oct 2099 07:28:00 GMT") > 1e6  # type: ignore[operator]


def test_bad_base_url() -> None:
    """The client says what a base URL must look like."""
    with pytest.raises(ValueError, match="http://"):
        HTTPModelClient("model:8000")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e999, object()])
def test_a_request_that_cannot_be_encoded_is_the_callers_error(bad: Any) -> None:
    """NaN, Infinity or a value JSON cannot hold: CallerError, nothing sent, breaker untouched."""
    sent: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200, json={}))
    breaker = CircuitBreaker(fail_max=1, reset_timeout=60)
    with pytest.raises(CallerError, match="finite numbers"):
        breaker.call(predict, "http://model", [1.0, 2.0, bad, 4.0], transport=transport)
    assert sent == []
    assert breaker.state is State.CLOSED
