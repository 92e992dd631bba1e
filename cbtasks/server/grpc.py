"""The reference model behind gRPC: ``/cbtasks.Model/Predict``, JSON messages.

Messages are JSON objects (``{"features": [...]}`` in, ``{"label", "probabilities"}``
out) through gRPC's generic handlers, so no generated code is needed on
either side. Injected faults map to status codes: an outage or 503 to
UNAVAILABLE, 429 to RESOURCE_EXHAUSTED (with ``retry-after`` in the trailing
metadata when set), other codes to INTERNAL; a bad request to INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
import math
import time
from concurrent import futures
from typing import Any

import grpc

from ._model import FEATURES, IrisModel, ServerState

SERVICE, METHOD = "cbtasks.Model", "Predict"
_CODES = {429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        # Not None: gRPC takes None for a failed deserializer and answers
        # INTERNAL (an endpoint failure); the handler answers INVALID_ARGUMENT.
        return f"not JSON a model can take ({exc})"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _encode(message: Any) -> bytes:
    return json.dumps(message).encode()


def _valid_features(request: Any) -> list[float] | None:
    features = request.get("features") if isinstance(request, dict) else None
    if not isinstance(features, list) or len(features) != FEATURES:
        return None
    if not all(
        isinstance(x, int | float)
        and not isinstance(x, bool)
        and math.isfinite(x)
        and 0 <= x <= 100
        for x in features
    ):
        return None
    return [float(x) for x in features]


def serve(state: ServerState, model: IrisModel, address: str) -> grpc.Server:
    """Start the service on ``address`` (host:port) in background threads."""

    def predict(request: Any, context: grpc.ServicerContext) -> Any:
        features = _valid_features(request)
        if features is None:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"send {{'features': [{FEATURES} numbers]}}, got {str(request)[:100]}",
            )
            return None  # abort() raises; this is for readers and type checkers
        request_id = dict(context.invocation_metadata()).get("x-request-id")
        phase = state.begin(request_id)
        ok = False
        try:
            if state.faults.latency_ms:
                time.sleep(state.faults.latency_ms / 1000)
            faults = state.failing()
            if faults is not None:
                if faults.retry_after is not None:
                    context.set_trailing_metadata(
                        (("retry-after", str(round(faults.retry_after))),)
                    )
                code = _CODES.get(faults.status_code, grpc.StatusCode.INTERNAL)
                context.abort(code, f"injected failure ({faults.status_code})")
            answer = model.predict(features)
            ok = True
            return answer
        finally:
            state.end(phase, request_id, ok)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.unary_unary_rpc_method_handler(
                predict, request_deserializer=_decode, response_serializer=_encode
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot listen for gRPC on {address}")
    server.start()
    return server
