"""The real client libraries meet the real servers' failures: what counts, what does not.

Each case is the call a user would naturally write, guarded by a default
``CircuitBreaker(fail_max=3, reset_timeout=30)``, meeting the same answer
four times: a caller's error leaves the circuit closed (four times the
library's own exception), an endpoint failure opens it (three, then
CircuitOpenError). The answers are those of each product's own source,
named where they are sent (tests/product_servers.py serves them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import boto3
import grpc
import httpx
import numpy as np
import openai
import pytest
import requests
import text_generation
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from botocore.config import Config
from huggingface_hub import InferenceClient

from cbtasks import CircuitBreaker, CircuitOpenError, Outcome, State
from tests.product_servers import Answer, GrpcAnswer, GrpcProductServer, ProductServer

CALLER, ENDPOINT, BUSY = "caller", "endpoint", "busy"


@pytest.fixture(scope="module")
def server() -> Iterator[ProductServer]:
    with ProductServer() as product:
        yield product


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[GrpcProductServer]:
    with GrpcProductServer() as product:
        yield product


def four_calls(call: Callable[[], object]) -> tuple[CircuitBreaker, list[BaseException]]:
    """Four guarded calls meeting the same answer; what each raised."""
    breaker = CircuitBreaker(fail_max=3, reset_timeout=30)
    raised: list[BaseException] = []
    for _ in range(4):
        try:
            breaker.call(call)
        except Exception as exc:
            raised.append(exc)
        else:
            pytest.fail("the call succeeded: the server did not answer as set")
    return breaker, raised


def assert_judged(
    call: Callable[[], object], expect: str, library_error: type[BaseException]
) -> list[BaseException]:
    breaker, raised = four_calls(call)
    if expect == BUSY:
        # The endpoint saying "busy" is its own outcome (it shrinks an adaptive
        # limit); a breaker without one counts it as a failure, as ever.
        assert breaker.classify(raised[0]) is Outcome.OVERLOAD, raised[0]
        expect = ENDPOINT
    if expect == CALLER:
        assert breaker.state is State.CLOSED
        assert all(type(e).__module__.split(".")[0] != "cbtasks" for e in raised), raised
        assert all(isinstance(e, library_error) for e in raised), raised
    else:
        assert breaker.state is State.OPEN
        assert all(isinstance(e, library_error) for e in raised[:3]), raised
        assert isinstance(raised[3], CircuitOpenError)
    return raised


# -- openai SDK (vLLM, TGI's Messages API, any OpenAI-compatible server) -----------


def openai_chat(server: ProductServer) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0) as client:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])


# vLLM: vllm/entrypoints/openai/serving_engine.py, create_error_response, and
# vllm/entrypoints/openai/protocol.py, ErrorResponse (the {"error": {...}} form).
def _vllm_error(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


OPENAI_CASES = [
    (
        "400 context length",
        Answer(
            400,
            _vllm_error(
                "This model's maximum context length is 4096 tokens. However, you requested "
                "5000 tokens (4900 in the messages, 100 in the completion).",
                "BadRequestError",
                400,
            ),
        ),
        CALLER,
        openai.BadRequestError,
    ),
    (
        "401 bad key",
        Answer(
            401,
            {
                "error": {
                    "message": "Incorrect API key provided",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
        ),
        CALLER,
        openai.AuthenticationError,
    ),
    (
        "404 unknown model",
        Answer(404, _vllm_error("The model `m` does not exist.", "NotFoundError", 404)),
        CALLER,
        openai.NotFoundError,
    ),
    (
        "500",
        Answer(500, _vllm_error("EngineCore encountered an issue.", "InternalServerError", 500)),
        ENDPOINT,
        openai.InternalServerError,
    ),
    (
        "503",
        Answer(503, {"error": {"message": "Service Unavailable"}}),
        ENDPOINT,
        openai.InternalServerError,
    ),
    (
        "429 rate limited",
        Answer(429, {"error": {"message": "Rate limit reached for requests", "type": "requests"}}),
        BUSY,
        openai.RateLimitError,
    ),
    (
        # TGI's Messages API answers its overload in the OpenAI form too.
        "429 model overloaded",
        Answer(429, {"error": "Model is overloaded", "error_type": "overloaded"}),
        BUSY,
        openai.RateLimitError,
    ),
]


@pytest.mark.parametrize(
    ("answer", "expect", "error"),
    [case[1:] for case in OPENAI_CASES],
    ids=[case[0] for case in OPENAI_CASES],
)
def test_openai_sdk(
    server: ProductServer, answer: Answer, expect: str, error: type[BaseException]
) -> None:
    """The openai SDK's caller errors never open the circuit; its server errors do."""
    server.answer("/v1/chat/completions", answer)
    assert_judged(lambda: openai_chat(server), expect, error)


def test_openai_429_retry_after_keeps_the_circuit_open_that_long(server: ProductServer) -> None:
    """A 429 with retry-after: 120 opens the circuit for at least 120 s, not reset_timeout."""
    server.answer(
        "/v1/chat/completions",
        Answer(429, {"error": {"message": "Too many requests"}}, headers={"retry-after": "120"}),
    )
    breaker = CircuitBreaker(fail_max=3, reset_timeout=30)
    with pytest.raises(openai.RateLimitError):
        breaker.call(openai_chat, server)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(openai_chat, server)
    assert 119 <= info.value.retry_after <= 120


def test_openai_retry_after_ms_is_read(server: ProductServer) -> None:
    """OpenAI's own retry-after-ms is honoured as well."""
    server.answer(
        "/v1/chat/completions",
        Answer(429, {"error": {"message": "slow down"}}, headers={"retry-after-ms": "45000"}),
    )
    breaker = CircuitBreaker(fail_max=3, reset_timeout=5)
    with pytest.raises(openai.RateLimitError):
        breaker.call(openai_chat, server)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(openai_chat, server)
    assert 44 <= info.value.retry_after <= 45


def test_openai_connection_refused_is_an_endpoint_failure() -> None:
    """Nothing listening: the SDK's APIConnectionError counts."""
    from cbtasks._testing.redis_server import free_port

    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="k", max_retries=0
    ) as client:
        assert_judged(lambda: client.models.list(), ENDPOINT, openai.APIConnectionError)


# -- tritonclient (http and grpc) ----------------------------------------------------


class TritonHTTPClient(triton_http.InferenceServerClient):  # type: ignore[misc]
    """tritonclient.http's client, closed by the test itself: its __del__ closes a gevent
    pool, which raises when the garbage collector runs it on another thread."""

    def __del__(self) -> None:
        pass


def triton_http_infer(server: ProductServer) -> None:
    client = TritonHTTPClient(url=server.url.removeprefix("http://"))
    tensor = triton_http.InferInput("INPUT0", [1, 16], "INT32")
    tensor.set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
    try:
        client.infer("simple", [tensor])
    finally:
        client.close()


# Triton: src/http_server.cc, HttpCodeFromError and EVBufferAddErrorJson
# ({"error": message}); the messages are core's (src/infer_request.cc,
# src/model_repository_manager/model_repository_manager.cc).
TRITON_CASES = [
    (
        "400 invalid argument (bad shape)",
        Answer(
            400,
            {
                "error": "[request id: <id_unknown>] unexpected shape for input 'INPUT0' for model "
                "'simple'. Expected [1,16], got [1,3]. "
            },
        ),
        CALLER,
    ),
    (
        "404 unknown model",
        Answer(404, {"error": "Request for unknown model: 'simple' is not found"}),
        CALLER,
    ),
    (
        "503 no available versions",
        Answer(503, {"error": "Request for unknown model: 'simple' has no available versions"}),
        ENDPOINT,
    ),
    (
        "500 internal",
        Answer(500, {"error": "failed to process the request(s) for model 'simple'"}),
        ENDPOINT,
    ),
    (
        "400 UNKNOWN: CUDA out of memory",
        Answer(400, {"error": "onnx runtime error 6: CUDA failure 2: out of memory"}),
        ENDPOINT,
    ),
    (
        # src/scheduler_utils.cc: past max_queue_size, TRITONSERVER_ERROR_UNAVAILABLE
        # "Exceeds maximum queue size", which HttpCodeFromError sends as 503.
        "503 queue full",
        Answer(503, {"error": "Exceeds maximum queue size"}),
        BUSY,
    ),
]


@pytest.mark.parametrize(
    ("answer", "expect"), [c[1:] for c in TRITON_CASES], ids=[c[0] for c in TRITON_CASES]
)
def test_tritonclient_http(server: ProductServer, answer: Answer, expect: str) -> None:
    """tritonclient.http: a bad shape or an unknown model is the caller's; 5xx and a device
    failure (which Triton sends as 400 UNKNOWN) are the endpoint's."""
    from tritonclient.utils import InferenceServerException

    server.answer("/v2/models/simple/infer", answer)
    assert_judged(lambda: triton_http_infer(server), expect, InferenceServerException)


def triton_grpc_infer(target: str) -> None:
    client = triton_grpc.InferenceServerClient(url=target)
    tensor = triton_grpc.InferInput("INPUT0", [1, 16], "INT32")
    tensor.set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
    try:
        client.infer("simple", [tensor])
    finally:
        client.close()


@pytest.mark.parametrize(
    ("code", "expect"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, CALLER),
        (grpc.StatusCode.NOT_FOUND, CALLER),
        (grpc.StatusCode.UNAVAILABLE, ENDPOINT),
        (grpc.StatusCode.INTERNAL, ENDPOINT),
    ],
)
def test_tritonclient_grpc(
    grpc_server: GrpcProductServer, code: grpc.StatusCode, expect: str
) -> None:
    """tritonclient.grpc wraps the status in InferenceServerException("StatusCode.X")."""
    from tritonclient.utils import InferenceServerException

    grpc_server.answer = GrpcAnswer(code, "as Triton says")
    assert_judged(lambda: triton_grpc_infer(grpc_server.target), expect, InferenceServerException)


def test_tritonclient_grpc_full_queue_is_busy(grpc_server: GrpcProductServer) -> None:
    """Triton's gRPC answer past max_queue_size: UNAVAILABLE "Exceeds maximum queue size"
    (src/scheduler_utils.cc) is the endpoint busy, not down."""
    from tritonclient.utils import InferenceServerException

    grpc_server.answer = GrpcAnswer(grpc.StatusCode.UNAVAILABLE, "Exceeds maximum queue size")
    expect = BUSY
    assert_judged(lambda: triton_grpc_infer(grpc_server.target), expect, InferenceServerException)


# -- boto3 sagemaker-runtime (real botocore parsing real HTTP answers) ---------------


def sagemaker_invoke(server: ProductServer) -> None:
    client = boto3.client(
        "sagemaker-runtime",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        config=Config(retries={"total_max_attempts": 1}),
    )
    try:
        client.invoke_endpoint(EndpointName="ep", Body=b"{}", ContentType="application/json")
    finally:
        client.close()


def _sagemaker_error(code: str, status: int, **fields: Any) -> Answer:
    # SageMaker Runtime is rest-json (botocore/data/sagemaker-runtime/2017-05-13/
    # service-2.json): the error code in x-amzn-ErrorType, the shape's members
    # in the body.
    return Answer(
        status,
        {"message": fields.pop("message", code), **fields},
        headers={
            "x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.sagemaker/"
        },
    )


SAGEMAKER_CASES = [
    ("ValidationError 400", _sagemaker_error("ValidationError", 400), CALLER),
    (
        "ModelError 424, container said 400",
        _sagemaker_error(
            "ModelError",
            424,
            OriginalStatusCode=400,
            OriginalMessage="bad input",
            message='Received client error (400) from primary with message "bad input".',
        ),
        CALLER,
    ),
    (
        "ModelError 424, container said 500",
        _sagemaker_error(
            "ModelError",
            424,
            OriginalStatusCode=500,
            OriginalMessage="CUDA out of memory",
            message='Received server error (500) from primary with message "CUDA OOM".',
        ),
        ENDPOINT,
    ),
    ("ModelNotReadyException 429", _sagemaker_error("ModelNotReadyException", 429), ENDPOINT),
    ("ThrottlingException 400", _sagemaker_error("ThrottlingException", 400), BUSY),
    ("ServiceUnavailable 503", _sagemaker_error("ServiceUnavailable", 503), ENDPOINT),
    ("InternalFailure 500", _sagemaker_error("InternalFailure", 500), ENDPOINT),
]


@pytest.mark.parametrize(
    ("answer", "expect"), [c[1:] for c in SAGEMAKER_CASES], ids=[c[0] for c in SAGEMAKER_CASES]
)
def test_boto3_sagemaker_runtime(server: ProductServer, answer: Answer, expect: str) -> None:
    """A ModelError is the endpoint's only when the container's own status was 5xx."""
    from botocore.exceptions import ClientError

    server.answer("/endpoints/ep/invocations", answer)
    assert_judged(lambda: sagemaker_invoke(server), expect, ClientError)


def test_boto3_connection_refused_is_an_endpoint_failure() -> None:
    """botocore's EndpointConnectionError counts."""
    from botocore.exceptions import EndpointConnectionError

    from cbtasks._testing.redis_server import free_port

    class Gone:
        url = f"http://127.0.0.1:{free_port()}"

    assert_judged(lambda: sagemaker_invoke(Gone()), ENDPOINT, EndpointConnectionError)  # type: ignore[arg-type]


# -- TGI through text-generation and huggingface_hub ---------------------------------

# TGI: router/src/server.rs, `impl From<InferError> for (StatusCode, Json<ErrorResponse>)`.
TGI_OOM = Answer(
    424,
    {
        "error": "Request failed during generation: Server error: CUDA out of memory. "
        "Tried to allocate 2.00 GiB",
        "error_type": "generation",
    },
)
TGI_OVERLOADED = Answer(429, {"error": "Model is overloaded", "error_type": "overloaded"})
TGI_VALIDATION = Answer(
    422,
    {
        "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
        "Given: 4000 `inputs` tokens and 200 `max_new_tokens`",
        "error_type": "validation",
    },
)
TGI_CASES = [
    ("424 generation (CUDA OOM)", TGI_OOM, ENDPOINT),
    ("429 overloaded", TGI_OVERLOADED, BUSY),
    ("422 validation", TGI_VALIDATION, CALLER),
]


@pytest.mark.parametrize(
    ("answer", "expect"), [c[1:] for c in TGI_CASES], ids=[c[0] for c in TGI_CASES]
)
# text-generation 0.7 still calls pydantic's v1 `.dict()`.
@pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")
def test_text_generation_client(server: ProductServer, answer: Answer, expect: str) -> None:
    """TGI's own client raises a class per error_type; each is judged by what it means."""
    from text_generation.errors import GenerationError, OverloadedError, ValidationError

    server.answer("/", answer)
    client = text_generation.Client(server.url, timeout=5)
    assert_judged(
        lambda: client.generate("hi", max_new_tokens=5),
        expect,
        (GenerationError, OverloadedError, ValidationError),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("answer", "expect"), [c[1:] for c in TGI_CASES], ids=[c[0] for c in TGI_CASES]
)
def test_huggingface_hub_inference_client(
    server: ProductServer, answer: Answer, expect: str
) -> None:
    """huggingface_hub's InferenceClient against TGI: its typed errors are judged the same way."""
    from huggingface_hub.errors import HfHubHTTPError, TextGenerationError

    server.answer("/", answer)
    client = InferenceClient(model=server.url, timeout=5)
    assert_judged(
        lambda: client.text_generation("hi", max_new_tokens=5),
        expect,
        (TextGenerationError, HfHubHTTPError),  # type: ignore[arg-type]
    )


# -- a user's own requests / httpx / aiohttp / grpc code -------------------------------


@pytest.mark.parametrize(
    ("status", "expect"),
    [(400, CALLER), (422, CALLER), (404, CALLER), (503, ENDPOINT), (408, ENDPOINT), (429, BUSY)],
)
def test_requests_raise_for_status(server: ProductServer, status: int, expect: str) -> None:
    """requests + raise_for_status(): a 4xx is the caller's, 408 and 5xx the endpoint's,
    429 the endpoint busy."""
    server.answer("/predict", Answer(status, {"detail": "as FastAPI answers"}))

    def call() -> None:
        requests.post(f"{server.url}/predict", json={"x": 1}, timeout=5).raise_for_status()

    assert_judged(call, expect, requests.HTTPError)


@pytest.mark.parametrize(("status", "expect"), [(400, CALLER), (422, CALLER), (502, ENDPOINT)])
def test_httpx_raise_for_status(server: ProductServer, status: int, expect: str) -> None:
    """httpx + raise_for_status(): the same judgement."""
    server.answer("/predict", Answer(status, {"detail": "x"}))

    def call() -> None:
        httpx.post(f"{server.url}/predict", json={"x": 1}, timeout=5).raise_for_status()

    assert_judged(call, expect, httpx.HTTPStatusError)


def test_ray_serve_backpressure_is_busy(server: ProductServer) -> None:
    """Ray Serve's proxy past max_ongoing_requests + max_queued_requests: a 503 whose text is
    BackPressureError's message (ray/serve/exceptions.py): busy, read through httpx."""
    message = "Request dropped due to backpressure (num_queued_requests=2, max_queued_requests=2)."
    server.answer("/predict", Answer(503, message))

    def call() -> None:
        httpx.post(f"{server.url}/predict", json={"x": 1}, timeout=5).raise_for_status()

    assert_judged(call, BUSY, httpx.HTTPStatusError)


def test_httpx_connection_refused_is_an_endpoint_failure() -> None:
    """Nothing listening: httpx's ConnectError counts."""
    from cbtasks._testing.redis_server import free_port

    url = f"http://127.0.0.1:{free_port()}/predict"
    assert_judged(lambda: httpx.post(url, json={}, timeout=5), ENDPOINT, httpx.ConnectError)


@pytest.mark.parametrize(("status", "expect"), [(400, CALLER), (401, CALLER), (503, ENDPOINT)])
def test_aiohttp_raise_for_status(server: ProductServer, status: int, expect: str) -> None:
    """aiohttp's ClientResponseError carries the status: the same judgement."""
    server.answer("/predict", Answer(status, {"detail": "x"}))

    async def post() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{server.url}/predict", json={"x": 1}) as response,
        ):
            response.raise_for_status()

    assert_judged(lambda: asyncio.run(post()), expect, aiohttp.ClientResponseError)


def grpc_predict(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = channel.unary_unary(
            "/model.Model/Predict",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        stub(b"{}", timeout=5)


@pytest.mark.parametrize(
    ("code", "expect"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, CALLER),
        (grpc.StatusCode.NOT_FOUND, CALLER),
        (grpc.StatusCode.PERMISSION_DENIED, CALLER),
        (grpc.StatusCode.UNAVAILABLE, ENDPOINT),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, BUSY),
        (grpc.StatusCode.DEADLINE_EXCEEDED, ENDPOINT),
    ],
)
def test_users_own_grpc_stub(
    grpc_server: GrpcProductServer, code: grpc.StatusCode, expect: str
) -> None:
    """A plain grpc stub's RpcError: INVALID_ARGUMENT and NOT_FOUND are the caller's."""
    grpc_server.answer = GrpcAnswer(code, "as the service says")
    assert_judged(lambda: grpc_predict(grpc_server.target), expect, grpc.RpcError)


def test_grpc_retry_pushback_keeps_the_circuit_open(grpc_server: GrpcProductServer) -> None:
    """grpc-retry-pushback-ms in the trailers is the server's "not before"."""
    grpc_server.answer = GrpcAnswer(
        grpc.StatusCode.UNAVAILABLE, "overloaded", (("grpc-retry-pushback-ms", "90000"),)
    )
    breaker = CircuitBreaker(fail_max=3, reset_timeout=5)
    with pytest.raises(grpc.RpcError):
        breaker.call(grpc_predict, grpc_server.target)
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(grpc_predict, grpc_server.target)
    assert 89 <= info.value.retry_after <= 90


# -- a user's own rule composes with the defaults ------------------------------------


@dataclass
class QuotaExceeded(Exception):
    """A user's own exception: their quota, not the endpoint's health."""

    tenant: str


def test_a_users_classify_composes_with_the_defaults(server: ProductServer) -> None:
    """The user's rule decides what it knows; None leaves the rest to the defaults."""
    from cbtasks import Outcome

    def classify(exc: BaseException) -> Outcome | None:
        if isinstance(exc, QuotaExceeded):
            return Outcome.IGNORED
        if isinstance(exc, openai.NotFoundError):
            return Outcome.FAILURE  # this team's router answers 404 while a model loads
        return None

    breaker = CircuitBreaker(fail_max=1, reset_timeout=30, classify=classify)
    with pytest.raises(QuotaExceeded):
        breaker.call(lambda: (_ for _ in ()).throw(QuotaExceeded("acme")))
    assert breaker.state is State.CLOSED
    server.answer("/v1/chat/completions", TGI_VALIDATION)  # a 422: the defaults' call
    with pytest.raises(openai.UnprocessableEntityError):
        breaker.call(openai_chat, server)
    assert breaker.state is State.CLOSED
    server.answer("/v1/chat/completions", Answer(404, _vllm_error("loading", "NotFoundError", 404)))
    with pytest.raises(openai.NotFoundError):
        breaker.call(openai_chat, server)
    assert breaker.state is State.OPEN
