"""A gRPC model client on grpcio that maps status codes to breaker outcomes."""

from __future__ import annotations

import json
from typing import Any

import grpc

from .._classify import grpc_code_outcome, retry_hint
from .._errors import CallerError, EndpointBusy, EndpointFailure
from .._state import Outcome
from ._encoding import encode_request
from ._health import HealthAnswer
from ._pool import per_process

__all__ = ["GRPCModelClient", "HealthAnswer", "grpc_client"]


class GRPCModelClient:
    """Calls a unary method with JSON messages; raises EndpointFailure or CallerError.

    UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL (and UNKNOWN,
    ABORTED, DATA_LOSS) are endpoint failures, with ``retry_after`` from the
    ``grpc-retry-pushback-ms`` or ``retry-after`` trailing metadata;
    INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED and the other codes are
    the caller's error. :meth:`healthy` asks the standard health service
    (``grpc.health.v1.Health/Check`` for ``health_service``) where the server
    has one, and falls back to the channel's readiness where it has not.
    """

    def __init__(
        self,
        target: str,
        *,
        method: str = "/cbtasks.Model/Predict",
        timeout: float = 10.0,
        health_service: str = "",
    ) -> None:
        if not target or "://" in target:
            raise ValueError(f"target must be host:port (or dns:host:port), got {target!r}")
        self.target = target
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target)
        self._call = self._channel.unary_unary(
            method,
            request_serializer=lambda encoded: encoded,  # encode_request did it
            response_deserializer=lambda raw: raw,
        )
        self._health_request = _health_check_request(health_service)
        self._health = self._channel.unary_unary(
            _HEALTH_CHECK,
            request_serializer=lambda encoded: encoded,
            response_deserializer=lambda raw: raw,
        )

    def __repr__(self) -> str:
        return f"GRPCModelClient({self.target!r})"

    def predict(self, payload: dict[str, Any], *, request_id: str | None = None) -> dict[str, Any]:
        """Send ``payload`` and return the JSON object answered."""
        metadata = (("x-request-id", request_id),) if request_id else None
        encoded = encode_request(payload)
        try:
            raw = self._call(encoded, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details()
            message = f"{self.target}: {code.name}: {details}"
            outcome = grpc_code_outcome(code.name, str(details or ""))
            if outcome is Outcome.IGNORED:
                raise CallerError(message, status=code.name) from exc
            failure = EndpointBusy if outcome is Outcome.OVERLOAD else EndpointFailure
            raise failure(message, status=code.name, retry_after=retry_hint(exc)) from exc
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise EndpointFailure(f"{self.target}: the answer is not a JSON object: {raw[:200]!r}")
        return body

    def healthy(self, timeout: float = 2.0) -> bool:
        """True when the server says SERVING within ``timeout`` seconds; never raises.

        Asks ``grpc.health.v1.Health/Check``; a server without the health
        service (UNIMPLEMENTED) is healthy when its channel connects. For a
        breaker's ``health_check``: it may end an open period early, and only
        real predictions then close the circuit. :meth:`health` answers the
        same and says why not.
        """
        return self.health(timeout).ready

    def health(self, timeout: float = 2.0) -> HealthAnswer:
        """As :meth:`healthy`, as a :class:`HealthAnswer` that says why not (deadline
        exceeded, unreachable, or the status the server gave); never raises."""
        try:
            answer = self._health(self._health_request, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.UNIMPLEMENTED:
                return self._connects(timeout)
            said = f"{self.target}: health check: {code.name}: {exc.details()}"
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return HealthAnswer(False, TimeoutError(said))
            if code is grpc.StatusCode.UNAVAILABLE:
                return HealthAnswer(False, ConnectionError(said))
            # NOT_FOUND (an unknown service), ...
            return HealthAnswer(False, EndpointFailure(said, status=code.name))
        except Exception as exc:  # a closed channel
            return HealthAnswer(False, exc)
        if answer == _SERVING:
            return HealthAnswer(True)
        status = _serving_status(answer)
        return HealthAnswer(
            False, EndpointFailure(f"{self.target}: health check: {status}", status=status)
        )

    def _connects(self, timeout: float) -> HealthAnswer:
        """A server without the health service: healthy when its channel connects."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return HealthAnswer(
                False, TimeoutError(f"{self.target}: the channel did not connect in {timeout:g} s")
            )
        except Exception as exc:  # a closed channel
            return HealthAnswer(False, exc)
        return HealthAnswer(True)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GRPCModelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# grpc.health.v1 (grpc/src/proto/grpc/health/v1/health.proto), written by hand so
# that no generated code is needed: HealthCheckRequest {string service = 1;},
# HealthCheckResponse {ServingStatus status = 1;} with SERVING = 1.
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_SERVING = b"\x08\x01"
#: grpc.health.v1.HealthCheckResponse.ServingStatus, by number.
_SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _serving_status(answer: object) -> str:
    """The status name in a raw HealthCheckResponse (field 1, a varint; absent when 0)."""
    if answer == b"":
        return "UNKNOWN"
    if isinstance(answer, bytes) and len(answer) == 2 and answer[0] == 0x08:
        return _SERVING_STATUS.get(answer[1], f"status {answer[1]}")
    return f"an unreadable answer {answer!r:.40}"


def _health_check_request(service: str) -> bytes:
    name = service.encode()
    if not name:
        return b""
    if len(name) > 127:
        raise ValueError(f"health_service must be at most 127 bytes, got {service!r}")
    return b"\x0a" + bytes([len(name)]) + name


def grpc_client(target: str) -> GRPCModelClient:
    """The process's client (one channel) for ``target``, a new one after a fork."""
    return per_process("grpc", target, GRPCModelClient)
