"""An HTTP model client on httpx, one pooled connection pool per process."""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from .._errors import CallerError, EndpointFailure
from ._encoding import encode_request
from ._pool import per_process

__all__ = ["HTTPModelClient", "http_client"]

# 429 and 503 are the endpoint saying "not now"; other 4xx are the caller's fault.
_ENDPOINT_BUSY = (429, 503)


class HTTPModelClient:
    """Calls a JSON model endpoint and maps every answer to an outcome.

    Connection errors, timeouts, 5xx, 429 and a body that is not a JSON
    object raise :class:`EndpointFailure` (with ``retry_after`` when the
    endpoint sent Retry-After); other 4xx raise :class:`CallerError`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers=headers,
            limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
        )

    def __repr__(self) -> str:
        return f"HTTPModelClient({self.base_url!r})"

    def predict(
        self, payload: dict[str, Any], *, path: str = "/predict", request_id: str | None = None
    ) -> dict[str, Any]:
        """POST ``payload`` as JSON and return the JSON object answered."""
        body = encode_request(payload)
        headers = {"Content-Type": "application/json"}
        if request_id:
            headers["X-Request-ID"] = request_id
        try:
            response = self._client.post(path, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise EndpointFailure(f"{self.base_url}{path} timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise EndpointFailure(f"cannot reach {self.base_url}{path}: {exc}") from exc
        status = response.status_code
        if status >= 500 or status in _ENDPOINT_BUSY:
            raise EndpointFailure(
                f"{self.base_url}{path} answered {status}",
                status=status,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status >= 400:
            raise CallerError(
                f"{self.base_url}{path} refused the request ({status}): {response.text[:500]}",
                status=status,
            )
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise EndpointFailure(
                f"{self.base_url}{path} answered {status} with a body that is not a JSON object: "
                f"{response.text[:200]!r}",
                status=status,
            )
        return answer

    def healthy(self, path: str = "/healthz", timeout: float = 2.0) -> bool:
        """True when ``GET path`` answers 2xx within ``timeout`` seconds; never raises.

        For a breaker's ``health_check``: it may end an open period early, and
        only real predictions then close the circuit.
        """
        try:
            return self._client.get(path, timeout=timeout).is_success
        except Exception:  # any failure to answer is "not healthy"
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPModelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    import datetime

    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def http_client(base_url: str) -> HTTPModelClient:
    """The process's pooled client for ``base_url`` (a new pool after a fork)."""
    return per_process("http", base_url, HTTPModelClient)
