"""What each model server says, and where it says it is ready.

A profile tells :class:`~cbtasks.clients.HTTPModelClient` the server's
readiness path and how to read an answer where the status alone misleads:
Triton's UNKNOWN errors arrive as 400, MLServer's "model not ready" too,
TF Serving's status endpoint answers 200 while the model is still LOADING,
TGI names the kind of each error in ``error_type``. Each rule cites the
server's source it follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._classify import NOT_READY_WORDS, http_status_outcome, triton_outcome
from .._state import Outcome

__all__ = ["PROFILES", "ServerProfile", "profile_named"]

# An error answer (status, its text, its JSON if any) -> outcome; None: by status.
ErrorReader = Callable[[int, str, Any], Outcome | None]
# A readiness answer (status, its JSON if any) -> ready.
ReadyReader = Callable[[int, Any], bool]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerProfile:
    """A model server's readiness path and the rules for reading its answers."""

    name: str
    #: GET this path: ready when ``ready`` says so.
    health_path: str
    read_error: ErrorReader
    ready: ReadyReader

    def outcome(self, status: int, text: str, body: Any) -> Outcome:
        """The outcome of an answer with a status of 400 or more."""
        return (
            self.read_error(status, text, body)
            or http_status_outcome(status, text)
            or Outcome.FAILURE
        )


def _by_status(status: int, text: str, body: Any) -> Outcome | None:
    if 400 <= status < 500 and status not in (408, 424, 425, 429) and NOT_READY_WORDS.search(text):
        return Outcome.FAILURE
    return None


def _success(status: int, body: Any) -> bool:
    return 200 <= status < 300


def _triton(status: int, text: str, body: Any) -> Outcome | None:
    # Triton: src/http_server.cc, HttpCodeFromError, and the {"error": msg} body.
    message = body.get("error") if isinstance(body, dict) else None
    return triton_outcome(status, message if isinstance(message, str) else text)


def _tgi(status: int, text: str, body: Any) -> Outcome | None:
    # TGI: router/src/server.rs, `impl From<InferError>`: error_type "generation"
    # (424, a CUDA OOM among them), "overloaded" (429), "incomplete_generation"
    # (500) are the server's; "validation", "template_error", "tool_error" (422)
    # are the request's.
    kind = body.get("error_type") if isinstance(body, dict) else None
    if kind == "overloaded":
        return Outcome.OVERLOAD
    if kind in ("generation", "incomplete_generation"):
        return Outcome.FAILURE
    if kind in ("validation", "template_error", "tool_error", "tokenizer"):
        return Outcome.IGNORED
    return _by_status(status, text, body)


def _tfserving_ready(status: int, body: Any) -> bool:
    # TF Serving: GET /v1/models/NAME answers 200 while a version is still
    # LOADING (model_service_impl.cc, GetModelStatus): ready only when one is
    # AVAILABLE.
    if not 200 <= status < 300 or not isinstance(body, dict):
        return False
    versions = body.get("model_version_status")
    return isinstance(versions, list) and any(
        isinstance(v, dict) and v.get("state") == "AVAILABLE" for v in versions
    )


def _torchserve_ready(status: int, body: Any) -> bool:
    # TorchServe: GET /ping answers {"status": "Healthy"} (or "Partial Healthy"
    # / "Unhealthy" with 500) (frontend ... PingRequestHandler).
    return 200 <= status < 300 and isinstance(body, dict) and body.get("status") == "Healthy"


def _kserve_v2_ready(status: int, body: Any) -> bool:
    # KServe v2 / Open Inference Protocol: GET /v2/health/ready, 200 when ready
    # (some servers add {"ready": true}; a false there is not ready).
    if not 200 <= status < 300:
        return False
    return not (isinstance(body, dict) and body.get("ready") is False)


def _profile(
    name: str, health_path: str, read_error: ErrorReader, ready: ReadyReader
) -> ServerProfile:
    return ServerProfile(name=name, health_path=health_path, read_error=read_error, ready=ready)


#: The profiles by name: ``http_client(url, profile="tgi")``.
PROFILES: dict[str, ServerProfile] = {
    profile.name: profile
    for profile in (
        _profile("generic", "/healthz", _by_status, _success),
        _profile("triton", "/v2/health/ready", _triton, _kserve_v2_ready),
        _profile("kserve", "/v2/health/ready", _by_status, _kserve_v2_ready),
        _profile("mlserver", "/v2/health/ready", _by_status, _kserve_v2_ready),
        _profile("tgi", "/health", _tgi, _success),
        # vLLM's OpenAI-compatible server: /health (vllm/entrypoints/openai/api_server.py).
        _profile("vllm", "/health", _by_status, _success),
        # Any OpenAI-compatible server: /v1/models answers when it serves.
        _profile("openai", "/v1/models", _by_status, _success),
        _profile("torchserve", "/ping", _by_status, _torchserve_ready),
        # TF Serving's readiness is per model: pass health_path="/v1/models/NAME".
        _profile("tfserving", "/v1/models", _by_status, _tfserving_ready),
        # BentoML: /readyz (bentoml/_internal/server/http_app.py).
        _profile("bentoml", "/readyz", _by_status, _success),
        # Ray Serve's proxy: /-/healthz (ray/serve/_private/proxy.py).
        _profile("ray", "/-/healthz", _by_status, _success),
    )
}


def profile_named(name: str | ServerProfile) -> ServerProfile:
    """The profile called ``name`` (or ``name`` itself); ValueError naming the choices."""
    if isinstance(name, ServerProfile):
        return name
    profile = PROFILES.get(name) if isinstance(name, str) else None
    if profile is None:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {name!r}")
    return profile
