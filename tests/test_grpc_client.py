"""The gRPC model client: status codes mapped to outcomes, against the real gRPC service."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cbtasks import CallerError, CircuitBreaker, EndpointFailure, State
from cbtasks._testing.processes import ModelServer
from cbtasks._testing.redis_server import free_port
from cbtasks.clients import GRPCModelClient

FEATURES = {"features": [5.1, 3.5, 1.4, 0.2]}


@pytest.fixture(scope="module")
def server() -> Iterator[ModelServer]:
    with ModelServer(grpc_port=0) as model:
        yield model


@pytest.fixture
def model(server: ModelServer) -> ModelServer:
    server.clear_faults()
    return server


def predict(target: str, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    with GRPCModelClient(target, timeout=timeout) as client:
        return client.predict(payload, request_id="req-1")


def test_prediction_over_grpc(model: ModelServer) -> None:
    """The same model answers over gRPC."""
    assert model.grpc_target
    assert predict(model.grpc_target, FEATURES)["label"] == "setosa"


@pytest.mark.parametrize(
    ("status", "code"), [(503, "UNAVAILABLE"), (429, "RESOURCE_EXHAUSTED"), (500, "INTERNAL")]
)
def test_failure_codes_are_endpoint_failures(model: ModelServer, status: int, code: str) -> None:
    """UNAVAILABLE, RESOURCE_EXHAUSTED and INTERNAL count against the breaker."""
    assert model.grpc_target
    model.faults(error_rate=1.0, status_code=status)
    with pytest.raises(EndpointFailure) as info:
        predict(model.grpc_target, FEATURES)
    assert info.value.status == code


def test_retry_after_in_trailing_metadata(model: ModelServer) -> None:
    """RESOURCE_EXHAUSTED with retry-after keeps the circuit open that long."""
    assert model.grpc_target
    model.faults(error_rate=1.0, status_code=429, retry_after=12)
    breaker = CircuitBreaker(fail_max=5)
    with pytest.raises(EndpointFailure) as info:
        breaker.call(predict, model.grpc_target, FEATURES)
    assert info.value.retry_after == 12
    assert breaker.state is State.OPEN


def test_deadline_exceeded_is_an_endpoint_failure(model: ModelServer) -> None:
    """Slower than the client's deadline: the endpoint's fault."""
    assert model.grpc_target
    model.faults(latency_ms=2000)
    with pytest.raises(EndpointFailure) as info:
        predict(model.grpc_target, FEATURES, timeout=0.2)
    assert info.value.status == "DEADLINE_EXCEEDED"


def test_invalid_argument_is_the_callers_error(model: ModelServer) -> None:
    """INVALID_ARGUMENT raises CallerError, which leaves the breaker alone."""
    assert model.grpc_target
    breaker = CircuitBreaker(fail_max=1)
    with pytest.raises(CallerError) as info:
        breaker.call(predict, model.grpc_target, {"features": [1, 2]})
    assert info.value.status == "INVALID_ARGUMENT"
    assert breaker.state is State.CLOSED


def test_unknown_method_is_the_callers_error(model: ModelServer) -> None:
    """UNIMPLEMENTED (a wrong method name) is the caller's mistake."""
    assert model.grpc_target
    with (
        GRPCModelClient(model.grpc_target, method="/cbtasks.Model/Nope") as client,
        pytest.raises(CallerError, match="UNIMPLEMENTED"),
    ):
        client.predict(FEATURES)


def test_nothing_listening_is_unavailable() -> None:
    """A refused connection is UNAVAILABLE: an endpoint failure."""
    with pytest.raises(EndpointFailure) as info:
        predict(f"127.0.0.1:{free_port()}", FEATURES, timeout=2)
    assert info.value.status == "UNAVAILABLE"


def test_bad_target() -> None:
    """A URL is not a gRPC target: the error says what is."""
    with pytest.raises(ValueError, match="host:port"):
        GRPCModelClient("http://model:50051")


def test_a_request_that_cannot_be_encoded_is_the_callers_error() -> None:
    """NaN is refused before any call (it used to come back INTERNAL, an endpoint failure)."""
    client = GRPCModelClient(f"127.0.0.1:{free_port()}", timeout=1)  # nothing listens: never called
    breaker = CircuitBreaker(fail_max=1, reset_timeout=60)
    try:
        with pytest.raises(CallerError, match="finite numbers"):
            breaker.call(client.predict, {"features": [1.0, float("nan"), 3.0, 4.0]})
    finally:
        client.close()
    assert breaker.state is State.CLOSED


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"1e999"])
def test_the_server_refuses_numbers_json_cannot_hold(model: ModelServer, number: bytes) -> None:
    """Sent raw (as another client might): INVALID_ARGUMENT, the caller's error, not INTERNAL."""
    import grpc

    assert model.grpc_target
    with grpc.insecure_channel(model.grpc_target) as channel:
        call = channel.unary_unary(
            "/cbtasks.Model/Predict",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(b'{"features": [1, 2, ' + number + b", 4]}", timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
