"""A FastAPI gateway in front of Celery workers: async request processing for any task.

    from cbtasks.gateway import create_gateway

    class Summarize(BaseModel):
        text: str
        max_words: int = 50

    app = create_gateway(summarize, body=Summarize)   # uvicorn mymodule:app

``POST /predict?wait=2`` (the ``path`` is yours) validates the body, sends
the task with its arguments and waits up to ``wait`` seconds for its result:
200 with it, or 202 with ``{task_id, state}`` when it is not done in time
(``CIRCUIT_OPEN`` and ``retry_after`` while the task waits for the circuit).
While the circuit is open it does not wait for a result that cannot come:
the marked fallback at once where one is given, else the 202 at once; the
request is enqueued either way, and processed once the circuit closes.
``GET /tasks/{id}`` gives a task's state and result; ``/livez`` and
``/readyz`` are for the orchestrator. The gateway reads the circuit through
an AsyncRedisStore (an open circuit is answered from the local view, with no
Redis round trip) and never calls the model itself: the workers do.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import celery
import redis.asyncio as aredis
from celery.exceptions import CeleryError
from fastapi import FastAPI, Path, Query
from fastapi.responses import JSONResponse
from kombu.exceptions import KombuError
from pydantic import BaseModel

from . import fallbacks as fb
from ._breaker import CircuitBreaker
from ._errors import StoreError
from ._state import State
from .server.http import guard_inputs
from .stores import AsyncRedisStore
from .stores._connection import REDIS_TROUBLE
from .task._options import option, policy_of, redis_url

__all__ = ["Arguments", "create_gateway", "keyword_arguments"]

MAX_WAIT_SECONDS = 30.0
# The result backend is polled at these intervals (seconds), then at the last.
_POLL_STEPS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.1)
_TASK_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")


#: What a request's body becomes: the task's positional and keyword arguments.
Arguments = tuple[tuple[Any, ...], dict[str, Any]]


def keyword_arguments(body: BaseModel) -> Arguments:
    """The default: the body's fields are the task's keyword arguments."""
    return (), body.model_dump()


def create_gateway(
    task: celery.Task,
    *,
    body: type[BaseModel],
    arguments: Callable[[Any], Arguments] = keyword_arguments,
    fallback: fb.Fallback | None = None,
    result_url: str | None = None,
    path: str = "/predict",
) -> FastAPI:
    """A gateway that sends ``task`` (a CircuitBreakerTask) and answers for it.

    ``body`` is the request's pydantic model (validated: a bad body is a 422
    that never echoes its input); ``arguments`` turns a parsed body into the
    task's ``(args, kwargs)`` (default: its fields as keyword arguments).
    ``fallback`` answers at once while the circuit is open; ``result_url`` is
    the Celery result backend (Redis), by default the app's ``result_backend``.
    ``POST {path}`` sends the task, ``GET /tasks/{id}`` reads one.
    """
    if not (isinstance(body, type) and issubclass(body, BaseModel)):
        raise TypeError(f"body must be a pydantic model class, got {body!r}")
    backend_url = result_url or str(task.app.conf.result_backend or "")
    if not backend_url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(
            f"the gateway reads results from a Redis result backend; set CBTASKS_RESULT_URL "
            f"(the app's result_backend is {backend_url.split('@')[-1]!r})"
        )
    policy = policy_of(task)
    breaker_name = str(option(task, "breaker"))
    prefix = str(option(task, "prefix"))
    sender = _sender(task.app)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Made in the server's event loop: redis.asyncio connections belong to it.
        store = AsyncRedisStore(redis_url(task.app), prefix=prefix)
        results = aredis.Redis.from_url(backend_url, socket_timeout=1, socket_connect_timeout=1)
        app.state.store = store
        app.state.breaker = CircuitBreaker(breaker_name, policy=policy, store=store)
        app.state.results = results
        yield
        await results.aclose()
        await store.aclose()

    app = FastAPI(title="cbtasks gateway", lifespan=lifespan)
    guard_inputs(app)

    async def predict(
        request: Any,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 2.0,
    ) -> JSONResponse:
        breaker: CircuitBreaker = app.state.breaker
        state, retry_after = await breaker.acircuit()
        args, kwargs = arguments(request)
        try:
            sent = await asyncio.to_thread(
                sender.send_task, task.name, args=list(args), kwargs=kwargs
            )
        except (KombuError, CeleryError, OSError) as exc:
            return _error(503, f"cannot reach the broker to send the request: {exc}")
        if state is State.OPEN:
            if fallback is not None:
                kind, value = await asyncio.to_thread(fb.answer, fallback, task, args, kwargs)
                reason = "circuit is open; the request is queued for when it closes"
                return _answer(200, sent.id, "FALLBACK", result=fb.mark(kind, value, reason))
            return _answer(202, sent.id, "CIRCUIT_OPEN", retry_after=round(retry_after, 3))
        if wait == 0:
            return _answer(202, sent.id, "PENDING")
        try:
            meta = await _wait_for(app.state.results, task.app.backend, sent.id, wait)
        except REDIS_TROUBLE as exc:  # sent all the same: it can be asked for later
            detail = f"cannot read results now ({type(exc).__name__}); ask GET /tasks/{sent.id}"
            return _answer(202, sent.id, "PENDING", detail=detail)
        return _reply(sent.id, meta, waiting_status=202, failed_status=502)

    # The body's type is the caller's model: the route is declared with it.
    predict.__annotations__["request"] = body
    app.post(path)(predict)

    @app.get("/tasks/{task_id}")
    async def task_state(task_id: Annotated[str, Path(max_length=200)]) -> JSONResponse:
        if not _TASK_ID.fullmatch(task_id):
            return _error(422, "a task id is letters, digits and . _ : - (at most 200)")
        try:
            meta = await _read_meta(app.state.results, task.app.backend, task_id)
        except REDIS_TROUBLE as exc:
            return _error(503, f"cannot reach the result backend ({type(exc).__name__}: {exc})")
        return _reply(task_id, meta, waiting_status=200, failed_status=200)

    @app.get("/livez")
    async def livez() -> JSONResponse:
        """Liveness: the process answers. Nothing else: a restart fixes nothing more."""
        return JSONResponse({"status": "alive"})

    @app.get("/readyz")
    @app.get("/healthz")  # the name of earlier versions
    async def readyz() -> JSONResponse:
        """Readiness: 503 only when a request could not be queued (the broker is away).

        The breaker's Redis unreachable is said but is no reason to stop
        traffic: /predict still queues every request, and the breaker decides
        by its on_error meanwhile.
        """
        broker = await asyncio.to_thread(_broker_trouble, sender)
        store: AsyncRedisStore = app.state.store
        try:
            await store.ping()
            breaker_state = "reachable"
        except StoreError as exc:
            breaker_state = f"unreachable ({exc}); the breaker decides by its on_error"
        if broker is not None:
            return _error(503, f"cannot reach the broker: {broker}")
        return JSONResponse({"status": "ready", "breaker_state": breaker_state})

    return app


def _broker_trouble(sender: celery.Celery) -> str | None:
    """None when the broker takes a connection (one try, no wait between tries), else why not."""
    try:
        with sender.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
    except (KombuError, CeleryError, OSError) as exc:
        return str(exc)
    return None


def _sender(app: celery.Celery) -> celery.Celery:
    """An app that only sends: the same broker and routes, and no result backend.

    With the app's own Redis backend, every send would also subscribe to the
    task's result channel (for ``AsyncResult.get``), and never unsubscribe:
    the gateway reads results itself, with ``redis.asyncio``.
    """
    sender = celery.Celery(f"{app.main}-gateway", set_as_current=False)
    sender.conf.update(
        broker_url=app.conf.broker_url,
        broker_transport_options=app.conf.broker_transport_options,
        broker_use_ssl=app.conf.broker_use_ssl,
        task_routes=app.conf.task_routes,
        task_default_queue=app.conf.task_default_queue,
        task_serializer="json",
        accept_content=["json"],
        task_send_sent_event=app.conf.task_send_sent_event,
    )
    return sender


async def _read_meta(results: aredis.Redis, backend: Any, task_id: str) -> dict[str, Any] | None:
    raw = await results.get(backend.get_key_for_task(task_id))
    return None if raw is None else dict(json.loads(raw))


async def _wait_for(
    results: aredis.Redis, backend: Any, task_id: str, wait: float
) -> dict[str, Any] | None:
    """The task's stored state once it is final, or whatever it is after ``wait`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    steps = iter(_POLL_STEPS)
    while True:
        meta = await _read_meta(results, backend, task_id)
        if meta is not None and meta.get("status") in celery.states.READY_STATES:
            return meta
        left = deadline - loop.time()
        if left <= 0:
            return meta
        await asyncio.sleep(min(left, next(steps, _POLL_STEPS[-1])))


def _reply(
    task_id: str, meta: dict[str, Any] | None, *, waiting_status: int, failed_status: int
) -> JSONResponse:
    """A task's stored state as an answer: the result, the failure, or where it waits."""
    if meta is None:  # sent, not yet started (or an id nobody sent: Celery cannot tell)
        return _answer(waiting_status, task_id, "PENDING")
    status, result = meta.get("status"), meta.get("result")
    if status == celery.states.SUCCESS:
        marked = fb.is_fallback(result)
        return _answer(200, task_id, "FALLBACK" if marked else "SUCCESS", result=result)
    if status in celery.states.READY_STATES:
        error = result if isinstance(result, dict) else {"exc_message": result}
        exc_type = str(error.get("exc_type", status))
        # The caller's own mistake is a 422 here too, not a gateway failure.
        code = 422 if exc_type == "CallerError" and failed_status != 200 else failed_status
        return _answer(code, task_id, str(status), error=f"{exc_type}: {error.get('exc_message')}")
    info = result if isinstance(result, dict) else {}
    return _answer(waiting_status, task_id, str(status), **info)


def _answer(status_code: int, task_id: str, state: str, **fields: Any) -> JSONResponse:
    return JSONResponse({"task_id": task_id, "state": state, **fields}, status_code=status_code)


def _error(status_code: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code)
