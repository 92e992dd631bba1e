"""The reference model over HTTP: FastAPI with fault injection and per-phase counts."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._model import OVERLOADED, Capacity, Faults, IrisModel, Phase, PredictRequest, ServerState

__all__ = ["MAX_BODY_BYTES", "create_app"]

#: Larger request bodies get a 413 before they are read into memory.
MAX_BODY_BYTES = 64 * 1024


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, counted as it arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(scope, receive, send)
            return
        seen, refused = 0, False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes and not refused:
                # Answer now, and tell the app the client went away: it stops reading.
                refused = True
                await self._too_large(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body over {self.max_bytes} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def guard_inputs(app: FastAPI, max_bytes: int = MAX_BODY_BYTES) -> None:
    """A body size limit (413) and 422s that never echo the inputs back."""
    app.add_middleware(BodyLimit, max_bytes=max_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Without the inputs: NaN or Infinity in them cannot be sent back as JSON
        # (that was a 500, an endpoint failure, for the caller's mistake).
        errors = [
            {"loc": list(error.get("loc", ())), "msg": str(error.get("msg", ""))}
            for error in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def malformed(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # A body that is not even JSON is as malformed as a wrong field: 422 for both.
        status = 422 if exc.status_code == 400 else exc.status_code
        return JSONResponse({"detail": exc.detail}, status_code=status)


def create_app(
    state: ServerState | None = None,
    model: IrisModel | None = None,
    admin_token: str | None = None,
) -> FastAPI:
    """The HTTP app; a fresh model and no faults unless given.

    ``/admin`` (faults, phases, counts) exists only with an ``admin_token``,
    and then answers only requests that send ``Authorization: Bearer <token>``:
    whoever reaches the model server must not be able to take it down.
    """
    model = model or IrisModel()
    state = state or ServerState()
    app = FastAPI(title="cbtasks reference model server")
    guard_inputs(app)

    admin = APIRouter(dependencies=[Depends(_bearer(admin_token))])

    @app.get("/healthz")
    async def healthz() -> Any:
        # Down during an injected outage (as a crashed server would be); an
        # injected error rate leaves it up, as a health endpoint that does not
        # exercise the model would.
        if time.monotonic() < state.outage_until:
            return JSONResponse({"status": "down"}, status_code=503)
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(
        body: PredictRequest,
        request_id: Annotated[str | None, Header(alias="X-Request-ID")] = None,
    ) -> Any:
        arrived = time.time()
        phase = state.begin(request_id)
        ok = False
        gate = state.gate
        if not await gate.enter():
            phase.overloaded += 1
            state.end(phase, request_id, ok=False)
            status, busy = OVERLOADED[gate.capacity.overload]
            state.answered(arrived, status)
            return JSONResponse(busy, status_code=status)
        phase.peak_serving = max(phase.peak_serving, gate.serving)
        try:
            if gate.capacity.service_ms:
                await asyncio.sleep(gate.capacity.service_ms / 1000)
            if state.faults.latency_ms:
                await asyncio.sleep(state.faults.latency_ms / 1000)
            faults = state.failing()
            if faults is not None:
                headers = {}
                if faults.retry_after is not None:
                    headers["Retry-After"] = str(round(faults.retry_after))
                state.answered(arrived, faults.status_code)
                return JSONResponse(
                    {"detail": "injected failure"}, status_code=faults.status_code, headers=headers
                )
            answer = model.predict(body.features)
            ok = True
            state.answered(arrived, 200)
            return answer
        finally:
            gate.leave()
            state.end(phase, request_id, ok)

    @admin.put("/admin/capacity")
    async def set_capacity(capacity: Capacity) -> dict[str, Any]:
        state.gate.set(capacity)
        return capacity.model_dump()

    @admin.get("/admin/capacity")
    async def get_capacity() -> dict[str, Any]:
        gate = state.gate
        return {**gate.capacity.model_dump(), "serving": gate.serving, "waiting": gate.waiting}

    @admin.delete("/admin/capacity")
    async def clear_capacity() -> dict[str, Any]:
        state.gate.set(Capacity())
        return Capacity().model_dump()

    @admin.put("/admin/faults")
    async def set_faults(faults: Faults) -> dict[str, Any]:
        state.faults = faults
        state.outage_until = (
            time.monotonic() + faults.outage_seconds if faults.outage_seconds else 0.0
        )
        return faults.model_dump()

    @admin.delete("/admin/faults")
    async def clear_faults() -> dict[str, Any]:
        state.faults = Faults()
        state.outage_until = 0.0
        return state.faults.model_dump()

    @admin.put("/admin/phase")
    async def set_phase(phase: Phase) -> dict[str, str]:
        state.phase = phase.name
        return {"phase": phase.name}

    @admin.get("/admin/stats")
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

    @admin.get("/admin/calls")
    async def get_calls() -> list[tuple[float, float, int]]:
        """Each request answered since the stats were reset: (arrived at, seconds, status)."""
        return list(state.calls)

    @admin.delete("/admin/stats")
    async def reset_stats() -> dict[str, str]:
        state.phases.clear()
        state.calls.clear()
        state.answered_ids.clear()
        state.calls_after_success = 0
        state.phase = "default"
        return {"phase": state.phase}

    if admin_token:
        app.include_router(admin)
    return app


def _bearer(token: str | None) -> Any:
    """A dependency that refuses a request without ``Authorization: Bearer <token>``."""
    expected = f"Bearer {token}".encode()

    async def check(authorization: Annotated[str, Header()] = "") -> None:
        if not hmac.compare_digest(authorization.encode(), expected):
            raise StarletteHTTPException(401, "send Authorization: Bearer <admin token>")

    return check
