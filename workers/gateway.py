"""The example's gateway: the iris model's predictions through cbtasks.gateway.

    uvicorn workers.gateway:app --port 8080

``POST /predict?wait=2`` with ``{"features": [5.1, 3.5, 1.4, 0.2]}``; see
:mod:`cbtasks.gateway` for what it answers. Environment: as for the workers
(CBTASKS_REDIS_URL, CBTASKS_BROKER_URL, CBTASKS_RESULT_URL), and
CBTASKS_GATEWAY_FALLBACK: ``default`` (answer with the example's default
prediction while the circuit is open) or ``none``.
"""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from cbtasks import fallbacks as fb
from cbtasks.gateway import MAX_WAIT_SECONDS, create_gateway

__all__ = ["MAX_WAIT_SECONDS", "PredictRequest", "app", "create_gateway", "gateway_fallback"]


class PredictRequest(BaseModel):
    """Four finite numbers, as the example model takes them."""

    model_config = ConfigDict(strict=True, extra="forbid")

    features: Annotated[list[FiniteFloat], Field(min_length=4, max_length=4)]


def gateway_fallback(choice: str) -> fb.Fallback | None:
    """CBTASKS_GATEWAY_FALLBACK's choice: the example's default prediction, or none."""
    if choice == "none":
        return None
    if choice == "default":
        return fb.DefaultPrediction({"label": "unknown", "probabilities": []})
    raise ValueError(f"CBTASKS_GATEWAY_FALLBACK must be 'default' or 'none', got {choice!r}")


def _example_gateway() -> FastAPI:
    from workers.app import config, predict

    fallback = gateway_fallback(os.environ.get("CBTASKS_GATEWAY_FALLBACK", "default"))
    return create_gateway(
        predict, body=PredictRequest, fallback=fallback, result_url=config.result_url
    )


app = _example_gateway()
