"""An HTTP model client on httpx, one connection pool per process and configuration."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import httpx

from .._classify import headers_retry_hint, parse_retry_after
from .._errors import CallerError, EndpointBusy, EndpointFailure
from .._state import Outcome
from ._encoding import encode_request
from ._health import HealthAnswer
from ._pool import per_process
from .profiles import ServerProfile, profile_named

__all__ = ["HTTPModelClient", "HealthAnswer", "http_client", "parse_retry_after"]

_DEFAULT_TIMEOUT = 10.0


class HTTPModelClient:
    """Calls a model endpoint over HTTP and maps every answer to an outcome.

    Connection errors, timeouts, 5xx, 408, 424, 429, a "not ready" answer and
    a body that cannot be read raise :class:`EndpointFailure` (with
    ``retry_after`` when the endpoint sent ``Retry-After`` or
    ``retry-after-ms``); other 4xx raise :class:`CallerError`. ``profile``
    (a name from :data:`~cbtasks.clients.profiles.PROFILES`: "triton",
    "kserve", "mlserver", "tgi", "vllm", "openai", "torchserve", "tfserving",
    "bentoml", "ray", or "generic") sets the readiness path and reads the
    answers whose status alone misleads. ``headers`` go with every request
    (an API key, a bearer token); they are never shown in a repr or a log.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float | httpx.Timeout = _DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        profile: str | ServerProfile = "generic",
        health_path: str | None = None,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not isinstance(timeout, httpx.Timeout) and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
        ):
            raise ValueError(
                f"timeout must be a number of seconds above 0 (generation can take minutes: "
                f"timeout=120), got {timeout!r}"
            )
        self.base_url = base_url.rstrip("/")
        self.profile = profile_named(profile)
        self.health_path = health_path or self.profile.health_path
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers=dict(headers or {}),
            limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
        )

    def __repr__(self) -> str:
        return f"HTTPModelClient({self.base_url!r}, profile={self.profile.name!r})"

    # -- calls ---------------------------------------------------------------------

    def predict(
        self, payload: Any, *, path: str = "/predict", request_id: str | None = None
    ) -> Any:
        """POST ``payload`` (any JSON value) and return the JSON value answered."""
        response = self._send(path, encode_request(payload), "application/json", request_id)
        try:
            return response.json()
        except ValueError:
            raise EndpointFailure(
                f"{self.base_url}{path} answered {response.status_code} with a body that is "
                f"not JSON: {response.text[:200]!r}",
                status=response.status_code,
            ) from None

    def post_bytes(
        self,
        content: bytes,
        *,
        path: str,
        content_type: str = "application/octet-stream",
        request_id: str | None = None,
    ) -> bytes:
        """POST raw ``content`` (an image, a tensor, a protobuf) and return the raw answer."""
        if not isinstance(content, bytes | bytearray | memoryview):
            raise CallerError(f"content must be bytes, got {type(content).__name__}")
        return self._send(path, bytes(content), content_type, request_id).content

    def stream(self, payload: Any, *, path: str, request_id: str | None = None) -> Iterator[Any]:
        """POST ``payload`` and yield the events of a server-sent-event stream as they come.

        Each event's ``data`` is yielded as JSON when it parses, else as text;
        OpenAI's ``[DONE]`` ends the stream. An error event (TGI's
        ``{"error": ..., "error_type": ...}``, OpenAI's ``{"error": {...}}``)
        and a stream cut off midway raise :class:`EndpointFailure` (or
        :class:`CallerError` for a request's fault) from the iterator: under
        a breaker's decorator the call's outcome is recorded when the stream
        ends.
        """
        body = encode_request(payload)
        headers = self._headers("application/json", request_id)
        headers["Accept"] = "text/event-stream"
        url = f"{self.base_url}{path}"
        try:
            with self._client.stream("POST", path, content=body, headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response, path)
                for data in _sse_data(response.iter_lines()):
                    if data == "[DONE]":
                        return
                    event = _json_or_text(data)
                    if isinstance(event, dict) and event.get("error") is not None:
                        self._raise_error_event(event, url)
                    yield event
        except httpx.TimeoutException as exc:
            raise EndpointFailure(f"{url} timed out mid-stream: {exc}") from exc
        except httpx.TransportError as exc:
            raise EndpointFailure(f"the stream from {url} was cut off: {exc}") from exc

    def healthy(self, path: str | None = None, timeout: float = 2.0) -> bool:
        """True when the profile's readiness path says ready within ``timeout``; never raises.

        For a breaker's ``health_check``: it may end an open period early, and
        only real predictions then close the circuit. :meth:`health` answers
        the same and says why not.
        """
        return self.health(path, timeout).ready

    def health(self, path: str | None = None, timeout: float = 2.0) -> HealthAnswer:
        """Ask the readiness path: a :class:`HealthAnswer`, true when ready, otherwise
        with the reason (no answer in time, not reachable, or the status it
        answered); never raises. ``health_check=client.health`` lets the breaker's
        events and metrics tell a timeout from a refused connection from "not ready".
        """
        where = f"{self.base_url}{path or self.health_path}"
        try:
            response = self._client.get(path or self.health_path, timeout=timeout)
        except httpx.TimeoutException:
            return HealthAnswer(False, TimeoutError(f"{where}: no answer within {timeout:g} s"))
        except httpx.TransportError as exc:  # refused, unknown host, reset
            return HealthAnswer(False, ConnectionError(f"{where}: {exc or type(exc).__name__}"))
        except Exception as exc:  # a closed client: any failure to answer is "not healthy"
            return HealthAnswer(False, exc)
        try:
            body = response.json()
        except ValueError:
            body = None
        if self.profile.ready(response.status_code, body):
            return HealthAnswer(True)
        status = response.status_code
        return HealthAnswer(
            False, EndpointFailure(f"{where} answered {status}: not ready", status=status)
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPModelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- answers -------------------------------------------------------------------

    def _headers(self, content_type: str, request_id: str | None) -> dict[str, str]:
        headers = {"Content-Type": content_type}
        if request_id:
            headers["X-Request-ID"] = request_id
        return headers

    def _send(
        self, path: str, body: bytes, content_type: str, request_id: str | None
    ) -> httpx.Response:
        url = f"{self.base_url}{path}"
        try:
            response = self._client.post(
                path, content=body, headers=self._headers(content_type, request_id)
            )
        except httpx.TimeoutException as exc:
            raise EndpointFailure(f"{url} timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise EndpointFailure(f"cannot reach {url}: {exc}") from exc
        if response.status_code >= 400:
            self._raise_for(response, path)
        return response

    def _raise_for(self, response: httpx.Response, path: str) -> None:
        status = response.status_code
        text = response.text
        outcome = self.profile.outcome(status, text, _json_or_text(text))
        url = f"{self.base_url}{path}"
        if outcome is Outcome.IGNORED:
            raise CallerError(f"{url} refused the request ({status}): {text[:500]}", status=status)
        failure = EndpointBusy if outcome is Outcome.OVERLOAD else EndpointFailure
        raise failure(
            f"{url} answered {status}: {text[:200]}",
            status=status,
            retry_after=_retry_after(response),
        )

    def _raise_error_event(self, event: dict[str, Any], url: str) -> None:
        error = event["error"]
        detail = error if isinstance(error, dict) else {}
        status = _error_event_status(detail)
        text = json.dumps(event)[:500]
        outcome = self.profile.outcome(status, text, event)
        if outcome is Outcome.IGNORED:
            raise CallerError(f"{url} ended the stream with an error: {text}", status=status)
        failure = EndpointBusy if outcome is Outcome.OVERLOAD else EndpointFailure
        raise failure(f"{url} ended the stream with an error: {text}", status=status)


def _retry_after(response: httpx.Response) -> float | None:
    return headers_retry_hint({k.lower(): v for k, v in response.headers.items()})


# An OpenAI-style error event's ``type`` when its ``code`` is no HTTP status
# (OpenAI's own: "context_length_exceeded"): the status the type stands for.
# OpenAI's types (openai/_exceptions.py maps the statuses to them), vLLM's
# exception names (vllm/entrypoints/openai/protocol.py, ErrorResponse), and
# Anthropic's overloaded_error. Unknown: 500, a stream's server gave up.
_ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "BadRequestError": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "NotFoundError": 404,
    "rate_limit_error": 429,
    "overloaded_error": 429,
    "server_error": 500,
    "api_error": 500,
    "InternalServerError": 500,
}


def _error_event_status(detail: Mapping[str, Any]) -> int:
    """The HTTP status an error event stands for: its integer ``code``, else its ``type``."""
    code = detail.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    kind = detail.get("type")
    return _ERROR_TYPE_STATUS.get(kind, 500) if isinstance(kind, str) else 500


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The data of each server-sent event (several ``data:`` lines joined by newlines).

    An event is complete at its blank line: data pending when the stream ends
    is discarded, as the server-sent events specification says (a half-sent
    event is no event).
    """
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def http_client(
    base_url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = _DEFAULT_TIMEOUT,
    profile: str = "generic",
    health_path: str | None = None,
) -> HTTPModelClient:
    """The process's pooled client for ``base_url`` and this configuration (anew after a fork).

    Each distinct configuration (headers, timeout, profile) has its own pool,
    so two API keys never share a client.
    """
    frozen_headers = tuple(sorted((headers or {}).items()))
    key = repr((base_url, frozen_headers, timeout, profile, health_path))
    return per_process(
        "http",
        key,
        lambda _: HTTPModelClient(
            base_url,
            headers=dict(frozen_headers),
            timeout=timeout,
            profile=profile,
            health_path=health_path,
        ),
    )
