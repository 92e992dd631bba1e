"""Worker configuration from the environment, checked with messages that say what to set."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    broker_url: str
    redis_url: str
    result_url: str
    model_url: str
    model_grpc_target: str | None
    visibility_timeout: float
    redis_timeout: float
    metrics_port: int | None


def from_environment(env: dict[str, str] | None = None) -> WorkerConfig:
    """Read CBTASKS_* variables; the defaults suit one machine with Redis on 6379."""
    env = dict(os.environ if env is None else env)
    redis_url = env.get("CBTASKS_REDIS_URL", "redis://127.0.0.1:6379/0")
    broker_url = env.get("CBTASKS_BROKER_URL", redis_url)
    for name, url in (("CBTASKS_REDIS_URL", redis_url), ("CBTASKS_BROKER_URL", broker_url)):
        if "://" not in url:
            raise ValueError(f"{name} must be a URL such as redis://host:6379/0, got {url!r}")
    model_url = env.get("CBTASKS_MODEL_URL", "http://127.0.0.1:8000")
    if not model_url.startswith(("http://", "https://")):
        raise ValueError(
            f"CBTASKS_MODEL_URL must start with http:// or https://, got {model_url!r}"
        )
    raw_timeout = env.get("CBTASKS_VISIBILITY_TIMEOUT", "3600")
    try:
        visibility_timeout = float(raw_timeout)
    except ValueError:
        raise ValueError(
            f"CBTASKS_VISIBILITY_TIMEOUT must be a number of seconds, got {raw_timeout!r}"
        ) from None
    raw_redis_timeout = env.get("CBTASKS_REDIS_TIMEOUT", "0.25")
    try:
        redis_timeout = float(raw_redis_timeout)
    except ValueError:
        redis_timeout = math.nan
    if not 0 < redis_timeout <= 60:
        raise ValueError(
            "CBTASKS_REDIS_TIMEOUT must be a number of seconds above 0 and at most 60, "
            f"got {raw_redis_timeout!r}"
        )
    raw_port = env.get("CBTASKS_METRICS_PORT", "")
    metrics_port = None
    if raw_port:
        if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
            raise ValueError(
                f"CBTASKS_METRICS_PORT must be a port from 1 to 65535, got {raw_port!r}"
            )
        metrics_port = int(raw_port)
    return WorkerConfig(
        metrics_port=metrics_port,
        broker_url=broker_url,
        redis_url=redis_url,
        result_url=env.get("CBTASKS_RESULT_URL", redis_url),
        model_url=model_url.rstrip("/"),
        model_grpc_target=env.get("CBTASKS_MODEL_GRPC_TARGET") or None,
        visibility_timeout=visibility_timeout,
        redis_timeout=redis_timeout,
    )
