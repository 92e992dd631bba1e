"""cbtasks' own clients against the answers real servers give: profiles, streams, health.

The servers' answers follow their sources, named at each (served by
tests/product_servers.py); the gRPC health service is grpcio-health-checking's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from cbtasks import (
    BreakerPolicy,
    CallerError,
    CircuitBreaker,
    CircuitOpenError,
    CountWindow,
    EndpointBusy,
    EndpointFailure,
    State,
)
from cbtasks.clients import GRPCModelClient, HTTPModelClient, grpc_client, http_client
from cbtasks.clients.profiles import PROFILES
from tests.product_servers import Answer, GrpcAnswer, GrpcProductServer, ProductServer, sse


@pytest.fixture(scope="module")
def server() -> Iterator[ProductServer]:
    with ProductServer() as product:
        yield product


def judged(client: HTTPModelClient, path: str, payload: Any = None) -> tuple[State, type]:
    """Four guarded predictions; the circuit's state after them and the last error's type."""
    breaker = CircuitBreaker(fail_max=3, reset_timeout=30)
    last: type = type(None)
    for _ in range(4):
        try:
            breaker.call(client.predict, payload or {"inputs": "hi"}, path=path)
        except CircuitOpenError:
            pass
        except Exception as exc:
            last = type(exc)
    return breaker.state, last


# TGI: router/src/server.rs, `impl From<InferError>`: 424 for a generation error.
TGI_OOM = Answer(
    424,
    {
        "error": "Request failed during generation: Server error: CUDA out of memory",
        "error_type": "generation",
    },
)


@pytest.mark.parametrize("profile", ["generic", "tgi"])
def test_tgi_out_of_memory_opens_the_circuit(server: ProductServer, profile: str) -> None:
    """TGI's 424 (a CUDA OOM mid-generation) is the endpoint's failure, with or without the profile."""  # noqa: E501
    server.answer("/generate", TGI_OOM)
    with HTTPModelClient(server.url, profile=profile) as client:
        assert judged(client, "/generate") == (State.OPEN, EndpointFailure)


def test_tgi_validation_error_is_the_callers(server: ProductServer) -> None:
    """TGI's error_type "validation" (422) is the request's fault."""
    server.answer(
        "/generate",
        Answer(
            422,
            {
                "error": "Input validation error: `inputs` must have less than 4096 tokens",
                "error_type": "validation",
            },
        ),
    )
    with HTTPModelClient(server.url, profile="tgi") as client:
        assert judged(client, "/generate") == (State.CLOSED, CallerError)


def test_ray_serve_408_opens_the_circuit(server: ProductServer) -> None:
    """Ray Serve's proxy answers 408 when a request times out (ray/serve/_private/proxy.py)."""
    server.answer(
        "/app", Answer(408, "Request abc timed out after 30.0s.", {"Content-Type": "text/plain"})
    )
    with HTTPModelClient(server.url, profile="ray") as client:
        assert judged(client, "/app") == (State.OPEN, EndpointFailure)


@pytest.mark.parametrize("profile", ["generic", "mlserver"])
def test_mlserver_model_not_ready_400_opens_the_circuit(
    server: ProductServer, profile: str
) -> None:
    """MLServer's ModelNotReady is a 400 "Model x is not ready yet." (mlserver/errors.py)."""
    server.answer("/v2/models/iris/infer", Answer(400, {"error": "Model iris is not ready yet."}))
    with HTTPModelClient(server.url, profile=profile) as client:
        assert judged(client, "/v2/models/iris/infer") == (State.OPEN, EndpointFailure)


def test_triton_unknown_400_with_a_device_failure_opens_the_circuit(server: ProductServer) -> None:
    """Triton sends its UNKNOWN errors as 400 (http_server.cc); a CUDA failure is the endpoint's."""
    server.answer("/v2/models/m/infer", Answer(400, {"error": "CUDA failure 2: out of memory"}))
    with HTTPModelClient(server.url, profile="triton") as client:
        assert judged(client, "/v2/models/m/infer") == (State.OPEN, EndpointFailure)
    server.answer(
        "/v2/models/m/infer",
        Answer(
            400,
            {
                "error": "unexpected shape for input 'INPUT0' for model 'm'. "
                "Expected [1,16], got [1,3]."
            },
        ),
    )
    with HTTPModelClient(server.url, profile="triton") as client:
        assert judged(client, "/v2/models/m/infer") == (State.CLOSED, CallerError)


def test_torchserve_no_worker_503_opens_the_circuit(server: ProductServer) -> None:
    """TorchServe's ServiceUnavailableException (frontend/server/.../ErrorCodes): 503."""
    server.answer(
        "/predictions/m",
        Answer(
            503,
            {
                "code": 503,
                "type": "ServiceUnavailableException",
                "message": 'Model "m" has no worker to serve inference request. '
                "Please use scale workers API to add workers.",
            },
        ),
    )
    with HTTPModelClient(server.url, profile="torchserve") as client:
        assert judged(client, "/predictions/m") == (State.OPEN, EndpointFailure)


def test_a_json_array_answer_is_an_answer(server: ProductServer) -> None:
    """BentoML and TorchServe answer JSON arrays: returned as they are, counted a success."""
    server.answer("/classify", Answer(200, [[0.1, 0.9]]))
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30)
    with HTTPModelClient(server.url, profile="bentoml") as client:
        assert breaker.call(client.predict, {"x": 1}, path="/classify") == [[0.1, 0.9]]
    assert breaker.state is State.CLOSED


def test_raw_bytes_in_and_out(server: ProductServer) -> None:
    """An image in, a tensor's bytes out: no JSON on either side."""
    server.answer(
        "/predictions/resnet",
        Answer(200, b"\x00\x01\x02", {"Content-Type": "application/octet-stream"}),
    )
    with HTTPModelClient(server.url) as client:
        assert client.post_bytes(b"\xff\xd8jpeg", path="/predictions/resnet") == b"\x00\x01\x02"
        with pytest.raises(CallerError, match="bytes"):
            client.post_bytes("not bytes", path="/x")  # type: ignore[arg-type]


# -- readiness, by profile -------------------------------------------------------------


def test_tf_serving_loading_is_not_ready(server: ProductServer) -> None:
    """TF Serving's model status answers 200 while LOADING (model_service_impl.cc): not ready."""
    status = {
        "model_version_status": [
            {
                "version": "1",
                "state": "LOADING",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    server.answer("/v1/models/resnet", Answer(200, status))
    client = HTTPModelClient(server.url, profile="tfserving", health_path="/v1/models/resnet")
    with client:
        assert client.healthy() is False
        status["model_version_status"][0]["state"] = "AVAILABLE"
        server.answer("/v1/models/resnet", Answer(200, status))
        assert client.healthy() is True


def test_torchserve_ping_reads_the_status(server: ProductServer) -> None:
    """TorchServe's /ping says "Healthy" only when every model has its workers."""
    server.answer("/ping", Answer(500, {"status": "Unhealthy"}))
    with HTTPModelClient(server.url, profile="torchserve") as client:
        assert client.healthy() is False
        server.answer("/ping", Answer(200, {"status": "Healthy"}))
        assert client.healthy() is True


@pytest.mark.parametrize(("profile", "path"), [(p.name, p.health_path) for p in PROFILES.values()])
def test_each_profile_asks_its_servers_readiness_path(
    server: ProductServer, profile: str, path: str
) -> None:
    """Each profile's health check GETs the path its server serves readiness on."""
    before = server.requests.get(path, 0)
    server.answer(path, Answer(503, {"error": "not yet"}))
    with HTTPModelClient(server.url, profile=profile) as client:
        assert client.healthy() is False
    assert server.requests.get(path, 0) == before + 1


def test_an_unknown_profile_names_the_choices() -> None:
    """A typo in the profile's name says which names there are."""
    with pytest.raises(ValueError, match="tgi"):
        HTTPModelClient("http://model", profile="tgl")


# -- configuration: headers, timeout, one pool per configuration ----------------------


def test_http_client_pools_per_configuration() -> None:
    """The same configuration shares one client; different headers or timeouts do not."""
    a = http_client("http://model:1", headers={"Authorization": "Bearer a"}, timeout=120)
    assert http_client("http://model:1", headers={"Authorization": "Bearer a"}, timeout=120) is a
    assert (
        http_client("http://model:1", headers={"Authorization": "Bearer b"}, timeout=120) is not a
    )
    assert http_client("http://model:1", headers={"Authorization": "Bearer a"}) is not a
    assert "Bearer" not in repr(a)


def test_headers_reach_the_server() -> None:
    """An API key given to http_client goes with every request."""
    import httpx

    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(200, json={"ok": True})

    client = HTTPModelClient(
        "http://model",
        headers={"Authorization": "Bearer k"},
        transport=httpx.MockTransport(handler),
    )
    with client:
        client.predict({"x": 1})
    assert seen == ["Bearer k"]


@pytest.mark.parametrize("timeout", [0, -1, "10", True])
def test_a_bad_timeout_says_what_to_give(timeout: Any) -> None:
    """A timeout must be seconds above 0."""
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        HTTPModelClient("http://model", timeout=timeout)


# -- streams ------------------------------------------------------------------------------

# TGI's /generate_stream and vLLM's OpenAI stream: `data:` events, OpenAI's end with [DONE].
TOKENS = sse({"token": {"text": "Hel"}}, {"token": {"text": "lo"}}, "[DONE]")


def test_a_stream_is_read_as_it_comes_and_counts_when_it_ends(server: ProductServer) -> None:
    """Events are yielded in order; the call is recorded a success once the stream ends."""
    server.answer("/generate_stream", Answer(200, events=TOKENS))
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30)
    with HTTPModelClient(server.url, profile="tgi") as client:
        events = list(breaker.stream(client.stream, {"inputs": "hi"}, path="/generate_stream"))
    assert events == [{"token": {"text": "Hel"}}, {"token": {"text": "lo"}}]
    assert breaker.state is State.CLOSED


def test_a_stream_cut_off_midway_is_a_failure(server: ProductServer) -> None:
    """The connection closed before the stream's end: an endpoint failure, after the events read."""
    server.answer("/generate_stream", Answer(200, events=TOKENS[:1], cut_off=True))
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30)
    got: list[Any] = []
    with (
        HTTPModelClient(server.url, profile="tgi") as client,
        pytest.raises(EndpointFailure, match="cut off"),
    ):
        for event in breaker.stream(client.stream, {"inputs": "hi"}, path="/generate_stream"):
            got.append(event)
    assert got == [{"token": {"text": "Hel"}}]
    assert breaker.state is State.OPEN


def test_an_error_event_in_the_stream_is_judged_like_an_answer(server: ProductServer) -> None:
    """TGI sends a generation error as an event mid-stream: the endpoint's failure."""
    oom = {"error": "CUDA out of memory", "error_type": "generation"}
    server.answer("/generate_stream", Answer(200, events=sse({"token": {"text": "a"}}, oom)))
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30)

    @breaker
    def tokens() -> Iterator[Any]:
        with HTTPModelClient(server.url, profile="tgi") as client:
            yield from client.stream({"inputs": "hi"}, path="/generate_stream")

    with pytest.raises(EndpointFailure, match="CUDA"):
        list(tokens())
    assert breaker.state is State.OPEN


def test_an_incomplete_last_event_is_discarded(server: ProductServer) -> None:
    """The stream ended before the blank line that completes its last event: that event is
    no event (the server-sent events specification), and is not passed on."""
    events = sse({"token": {"text": "Hel"}}, {"token": {"text": "lo"}})
    server.answer("/generate_stream", Answer(200, events=events, unterminated=True))
    with HTTPModelClient(server.url, profile="tgi") as client:
        got = list(client.stream({"inputs": "hi"}, path="/generate_stream"))
    assert got == [{"token": {"text": "Hel"}}]


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        # OpenAI's own: a string code, the type says whose fault.
        (
            {"message": "maximum context length", "type": "invalid_request_error",
             "code": "context_length_exceeded"},
            CallerError,
        ),
        ({"message": "slow down", "type": "rate_limit_error", "code": None}, EndpointBusy),
        ({"message": "The server had an error", "type": "server_error", "code": None},
         EndpointFailure),
        ({"message": "as vLLM says", "type": "BadRequestError", "code": 400}, CallerError),
        ({"message": "something", "type": "mystery"}, EndpointFailure),
    ],
)  # fmt: skip
def test_an_openai_error_event_is_judged_by_its_type_without_a_status_code(
    server: ProductServer, error: dict[str, Any], raised: type[Exception]
) -> None:
    """An error event whose code is no HTTP status is read by its type, not taken for a 500."""
    server.answer("/v1/chat/completions", Answer(200, events=sse({"error": error})))
    with HTTPModelClient(server.url, profile="openai") as client, pytest.raises(raised) as info:
        list(client.stream({"model": "m"}, path="/v1/chat/completions"))
    assert type(info.value) is raised


def test_a_stream_the_consumer_stops_reading_is_a_success(server: ProductServer) -> None:
    """Breaking out of the loop is the caller's choice: the endpoint was answering."""
    server.answer("/generate_stream", Answer(200, events=TOKENS))
    # A window counts successes (the caller's errors are not counted at all).
    policy = BreakerPolicy(failure_rate=0.5, min_calls=1, window=CountWindow(calls=10))
    breaker = CircuitBreaker(policy=policy)
    with HTTPModelClient(server.url) as client:
        stream = breaker.stream(client.stream, {"inputs": "hi"}, path="/generate_stream")
        assert next(stream) == {"token": {"text": "Hel"}}
        stream.close()
    status = breaker.status()
    assert status is not None
    assert (status.state, status.window_calls, status.window_failures) == (State.CLOSED, 1, 0)


def test_an_open_circuit_stream_gets_the_fallback() -> None:
    """While open, a guarded stream raises CircuitOpenError, or yields from the fallback."""
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30, fallback=lambda: iter(["cached"]))
    breaker.force_open()

    @breaker
    def tokens() -> Iterator[str]:
        yield "live"

    assert list(tokens()) == ["cached"]


# -- gRPC: the standard health service and the pushback hint -----------------------------


def test_grpc_healthy_asks_the_standard_health_service() -> None:
    """grpc.health.v1: SERVING is healthy, NOT_SERVING is not, though the channel connects."""
    from grpc_health.v1 import health_pb2

    with GrpcProductServer() as server:
        client = grpc_client(server.target)
        server.health.set("", health_pb2.HealthCheckResponse.SERVING)
        assert client.healthy() is True
        server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert client.healthy() is False


def test_grpc_healthy_without_a_health_service_checks_the_channel() -> None:
    """A server without grpc.health.v1 (UNIMPLEMENTED) is healthy when it connects."""
    with GrpcProductServer(health=False) as server:
        assert grpc_client(server.target).healthy() is True


def test_grpc_client_reads_the_pushback_hint() -> None:
    """grpc-retry-pushback-ms reaches EndpointFailure.retry_after, and so the breaker."""
    with GrpcProductServer() as server:
        server.answer = GrpcAnswer(
            grpc.StatusCode.UNAVAILABLE, "busy", (("grpc-retry-pushback-ms", "2500"),)
        )
        with (
            GRPCModelClient(server.target, method="/model.Model/Predict") as client,
            pytest.raises(EndpointFailure) as info,
        ):
            client.predict({"features": [1.0]})
    assert info.value.retry_after == 2.5
