"""The reference model server: a real scikit-learn model behind FastAPI, with fault injection.

    python -m cbtasks.server [--host 127.0.0.1] [--port 8000]

A logistic regression is trained at start-up on the iris data set that ships
with scikit-learn (no downloads). Endpoints:

- ``POST /predict`` ``{"features": [4 numbers]}`` -> ``{"label", "probabilities"}``
- ``GET /healthz``
- with ``--grpc-port``, the same model and faults as the gRPC method
  ``/cbtasks.Model/Predict`` (JSON messages; see ``cbtasks.grpc_server``)
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
import threading
import time
from dataclasses import dataclass
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


class ServerState:
    """Faults and counts, shared by the HTTP app and the gRPC service (threads: locked)."""

    def __init__(self) -> None:
        self.faults = Faults()
        self.outage_until = 0.0
        self.phase = "default"
        self.in_flight = 0
        self.phases: dict[str, PhaseStats] = {}
        # Request ids that got an answer: a second call with one is a duplicate execution.
        self.answered_ids: set[str] = set()
        self.calls_after_success = 0
        self._lock = threading.Lock()
        self._rng = random.Random()

    def begin(self, request_id: str | None) -> PhaseStats:
        """A request arrived: count it, in its phase, with the concurrency it makes."""
        with self._lock:
            phase = self.phases.setdefault(self.phase, PhaseStats())
            phase.requests += 1
            self.in_flight += 1
            phase.peak_in_flight = max(phase.peak_in_flight, self.in_flight)
            if request_id in self.answered_ids:
                self.calls_after_success += 1
            return phase

    def failing(self) -> Faults | None:
        """The faults to answer with, if this request is to fail."""
        down = time.monotonic() < self.outage_until
        if down or (self.faults.error_rate and self._rng.random() < self.faults.error_rate):
            return self.faults
        return None

    def end(self, phase: PhaseStats, request_id: str | None, ok: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            if ok:
                phase.ok += 1
                if request_id:
                    self.answered_ids.add(request_id)
            else:
                phase.failed += 1


class IrisModel:
    """A logistic regression trained at start-up on scikit-learn's iris data set."""

    def __init__(self) -> None:
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        data = load_iris()
        self.labels = [str(name) for name in data.target_names]
        self.model = LogisticRegression(max_iter=500).fit(data.data, data.target)

    def predict(self, features: list[float]) -> dict[str, Any]:
        probabilities = self.model.predict_proba([features])[0]
        return {
            "label": self.labels[int(probabilities.argmax())],
            "probabilities": [round(float(p), 6) for p in probabilities],
        }


def create_app(state: ServerState | None = None, model: IrisModel | None = None) -> FastAPI:
    """The HTTP app; a fresh model and no faults unless given."""
    model = model or IrisModel()
    state = state or ServerState()
    app = FastAPI(title="cbtasks reference model server")

    @app.exception_handler(StarletteHTTPException)
    async def malformed(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # A body that is not even JSON is as malformed as a wrong field: 422 for both.
        status = 422 if exc.status_code == 400 else exc.status_code
        return JSONResponse({"detail": exc.detail}, status_code=status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(
        body: PredictRequest,
        request_id: Annotated[str | None, Header(alias="X-Request-ID")] = None,
    ) -> Any:
        phase = state.begin(request_id)
        ok = False
        try:
            if state.faults.latency_ms:
                await asyncio.sleep(state.faults.latency_ms / 1000)
            faults = state.failing()
            if faults is not None:
                headers = {}
                if faults.retry_after is not None:
                    headers["Retry-After"] = str(round(faults.retry_after))
                return JSONResponse(
                    {"detail": "injected failure"}, status_code=faults.status_code, headers=headers
                )
            answer = model.predict(body.features)
            ok = True
            return answer
        finally:
            state.end(phase, request_id, ok)

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
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--grpc-port", type=int, default=0, help="gRPC port (0: no gRPC)")
    args = parser.parse_args(argv)
    for name, port in (("--port", args.port), ("--grpc-port", args.grpc_port)):
        if not 0 <= port < 65536 or (name == "--port" and port == 0):
            parser.error(f"{name} must be 1 to 65535, got {port}")
    state, model = ServerState(), IrisModel()
    grpc_server = None
    if args.grpc_port:
        from .grpc_server import serve

        # Kept in a variable: a gRPC server that is garbage-collected stops.
        grpc_server = serve(state, model, f"{args.host}:{args.grpc_port}")
    uvicorn.run(create_app(state, model), host=args.host, port=args.port, log_level="warning")
    if grpc_server is not None:
        grpc_server.stop(grace=1)


if __name__ == "__main__":
    main()
