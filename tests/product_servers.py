"""Local servers that answer as real model servers do, for the real client libraries.

Triton, TGI, vLLM, TorchServe, TF Serving and SageMaker do not install from
PyPI here, so the tests call them with their real clients (tritonclient,
text-generation, huggingface_hub, openai, boto3, requests, httpx, aiohttp)
against these servers, which send exactly the status codes, headers and
bodies those products' own sources send. Each answer names the source file
it follows.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from cbtasks._testing.redis_server import free_port


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: a status, headers, and a JSON (or raw) body, or a stream of chunks."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Server-sent events' data, sent chunk by chunk; a stream ends with its last.
    events: tuple[str, ...] | None = None
    #: Close the connection after the events without ending the chunked body.
    cut_off: bool = False
    #: Send the last event without the blank line that ends it (an incomplete event).
    unterminated: bool = False

    def raw(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return b"" if self.body is None else json.dumps(self.body).encode()


class ProductServer:
    """An HTTP server on a free loopback port answering each path as it is told.

    ``answer(path, Answer(...))`` sets what POST or GET on ``path`` gets;
    ``requests`` counts the calls per path.
    """

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.requests: dict[str, int] = {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self._answer()

            def _answer(self) -> None:
                path = self.path.split("?", 1)[0]
                server.requests[path] = server.requests.get(path, 0) + 1
                answer = server.answers.get(path, Answer(404, {"error": f"no route {path}"}))
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if answer.events is None:
                    raw = answer.raw()
                    if "Content-Type" not in answer.headers:
                        self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i, data in enumerate(answer.events):
                    last = i == len(answer.events) - 1
                    end = "\n" if last and answer.unterminated else "\n\n"
                    chunk = f"data:{data}{end}".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                if answer.cut_off:
                    self.close_connection = True
                    return  # no terminating chunk: the body is incomplete
                self.wfile.write(b"0\r\n\r\n")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def answer(self, path: str, answer: Answer) -> None:
        self.answers[path] = answer

    def __enter__(self) -> ProductServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# -- gRPC: a user's own service, Triton's GRPCInferenceService, grpc.health.v1 ------


@dataclass
class GrpcAnswer:
    """The status a gRPC method answers with (OK: an empty message), and trailing metadata."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    trailers: tuple[tuple[str, str], ...] = ()


class GrpcProductServer:
    """A gRPC server on a free loopback port: ``/model.Model/Predict`` (bytes in and out),
    Triton's ``inference.GRPCInferenceService`` (tritonclient.grpc's stubs), and the
    standard health service when ``health`` is given.

    ``answer`` is what every call gets, until changed.
    """

    def __init__(self, *, health: bool = True) -> None:
        from grpc_health.v1 import health as grpc_health
        from grpc_health.v1 import health_pb2_grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.answer = GrpcAnswer()
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        owner = self

        def respond(context: grpc.ServicerContext) -> None:
            answer = owner.answer
            if answer.code is grpc.StatusCode.OK:
                return
            if answer.trailers:
                context.set_trailing_metadata(answer.trailers)
            context.abort(answer.code, answer.details)

        def predict(request: bytes, context: grpc.ServicerContext) -> bytes:
            respond(context)
            return b"{}"

        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "model.Model",
                    {
                        "Predict": grpc.unary_unary_rpc_method_handler(
                            predict,
                            request_deserializer=lambda raw: raw,
                            response_serializer=lambda raw: raw,
                        )
                    },
                ),
            )
        )

        class Triton(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
            # Triton's src/grpc/infer_handler.cc answers a failed request with
            # the code of its TRITONSERVER_Error (grpc_utils.cc, CodeToStatus).
            def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
                respond(context)
                return service_pb2.ModelInferResponse(model_name=request.model_name)

        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Triton(), self._server)
        self.health: Any = None
        if health:
            self.health = grpc_health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._server.add_insecure_port(self.target)

    def __enter__(self) -> GrpcProductServer:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)


def sse(*events: Any) -> tuple[str, ...]:
    """Events' data as a server sends them: JSON objects encoded, strings as they are."""
    return tuple(e if isinstance(e, str) else json.dumps(e) for e in events)


def chunks(events: Iterator[Any]) -> list[Any]:
    """Everything a stream yields, in order."""
    return list(events)
