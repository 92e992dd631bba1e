"""The reference model server: a real scikit-learn model behind FastAPI, with fault injection.

    python -m cbtasks.server [--host 127.0.0.1] [--port 8000]

A logistic regression is trained at start-up on the iris data set that ships
with scikit-learn (no downloads). Endpoints:

- ``POST /predict`` ``{"features": [4 numbers]}`` -> ``{"label", "probabilities"}``
- ``GET /healthz``
- ``PUT /admin/faults`` sets error rate, added latency, an outage for N
  seconds, the status code to answer and the Retry-After to send;
  ``DELETE /admin/faults`` clears them.
- ``GET /admin/stats`` counts the requests it got, per phase, with peak
  concurrency; ``PUT /admin/phase`` names the phase that counting goes to;
  ``DELETE /admin/stats`` starts over.

Tests, the demo and the benchmarks read exactly what reached the model here.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

FEATURES = 4


class PredictRequest(BaseModel):
    """Four measurements of an iris flower, in cm."""

    features: Annotated[
        list[Annotated[float, Field(ge=0, le=100)]], Field(min_length=4, max_length=4)
    ]


class Faults(BaseModel):
    """What goes wrong, and how, until cleared."""

    error_rate: float = Field(default=0.0, ge=0, le=1)
    latency_ms: float = Field(default=0.0, ge=0, le=60_000)
    outage_seconds: float = Field(default=0.0, ge=0, le=3600)
    status_code: int = Field(default=503, ge=400, le=599)
    retry_after: float | None = Field(default=None, ge=0, le=3600)


class Phase(BaseModel):
    name: str = Field(min_length=1, max_length=64)


@dataclass
class PhaseStats:
    requests: int = 0
    ok: int = 0
    failed: int = 0
    peak_in_flight: int = 0


@dataclass
class ServerState:
    faults: Faults = field(default_factory=Faults)
    outage_until: float = 0.0
    phase: str = "default"
    in_flight: int = 0
    phases: dict[str, PhaseStats] = field(default_factory=dict)
    # Request ids that got an answer: a second call with one is a duplicate execution.
    answered_ids: set[str] = field(default_factory=set)
    calls_after_success: int = 0


def _train() -> Any:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    data = load_iris()
    model = LogisticRegression(max_iter=500).fit(data.data, data.target)
    return model, list(data.target_names)


def create_app() -> FastAPI:
    """The app, with a freshly trained model and no faults."""
    model, labels = _train()
    state = ServerState()
    app = FastAPI(title="cbtasks reference model server")
    rng = random.Random()

    @app.exception_handler(StarletteHTTPException)
    async def malformed(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # A body that is not even JSON is as malformed as a wrong field: 422 for both.
        status = 422 if exc.status_code == 400 else exc.status_code
        return JSONResponse({"detail": exc.detail}, status_code=status)

    def stats() -> PhaseStats:
        return state.phases.setdefault(state.phase, PhaseStats())

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(
        body: PredictRequest,
        request_id: Annotated[str | None, Header(alias="X-Request-ID")] = None,
    ) -> Any:
        phase = stats()
        phase.requests += 1
        state.in_flight += 1
        phase.peak_in_flight = max(phase.peak_in_flight, state.in_flight)
        if request_id in state.answered_ids:
            state.calls_after_success += 1
        try:
            faults = state.faults
            if faults.latency_ms:
                await asyncio.sleep(faults.latency_ms / 1000)
            down = time.monotonic() < state.outage_until
            if down or (faults.error_rate and rng.random() < faults.error_rate):
                phase.failed += 1
                headers = {}
                if faults.retry_after is not None:
                    headers["Retry-After"] = str(round(faults.retry_after))
                return JSONResponse(
                    {"detail": "injected failure"}, status_code=faults.status_code, headers=headers
                )
            probabilities = model.predict_proba([body.features])[0]
            best = int(probabilities.argmax())
            phase.ok += 1
            if request_id:
                state.answered_ids.add(request_id)
            return {
                "label": labels[best],
                "probabilities": [round(float(p), 6) for p in probabilities],
            }
        finally:
            state.in_flight -= 1

    @app.put("/admin/faults")
    async def set_faults(faults: Faults) -> dict[str, Any]:
        state.faults = faults
        state.outage_until = (
            time.monotonic() + faults.outage_seconds if faults.outage_seconds else 0.0
        )
        return faults.model_dump()

    @app.delete("/admin/faults")
    async def clear_faults() -> dict[str, Any]:
        state.faults = Faults()
        state.outage_until = 0.0
        return state.faults.model_dump()

    @app.put("/admin/phase")
    async def set_phase(phase: Phase) -> dict[str, str]:
        state.phase = phase.name
        return {"phase": phase.name}

    @app.get("/admin/stats")
    async def get_stats() -> dict[str, Any]:
        return {
            "phase": state.phase,
            "in_flight": state.in_flight,
            "down": time.monotonic() < state.outage_until,
            "phases": {name: vars(s) for name, s in state.phases.items()},
            "requests": sum(s.requests for s in state.phases.values()),
            "ok": sum(s.ok for s in state.phases.values()),
            "calls_after_success": state.calls_after_success,
        }

    @app.delete("/admin/stats")
    async def reset_stats() -> dict[str, str]:
        state.phases.clear()
        state.answered_ids.clear()
        state.calls_after_success = 0
        state.phase = "default"
        return {"phase": state.phase}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="cbtasks reference model server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1 to 65535, got {args.port}")
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
