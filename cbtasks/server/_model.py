"""The reference model and the server's shared state: faults to inject, counts per phase."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FEATURES = 4


class PredictRequest(BaseModel):
    """Four measurements of an iris flower, in cm."""

    features: Annotated[
        list[Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]],
        Field(min_length=4, max_length=4),
    ]


class Faults(BaseModel):
    """What goes wrong, and how, until cleared. An unknown field is refused (422):
    a misspelt fault must not pass for one injected."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    latency_ms: float = Field(default=0.0, ge=0, le=60_000, allow_inf_nan=False)
    outage_seconds: float = Field(default=0.0, ge=0, le=3600, allow_inf_nan=False)
    status_code: int = Field(default=503, ge=400, le=599)
    retry_after: float | None = Field(default=None, ge=0, le=3600, allow_inf_nan=False)


class Capacity(BaseModel):
    """How much the model serves at once, as the servers people run do.

    ``concurrency`` calls are served at once, each taking ``service_ms``; up to
    ``queue`` more wait their turn (their latency grows with the queue); beyond
    that the answer is "overloaded" at once, in ``overload``'s form: TGI's 429
    ``{"error": "Model is overloaded", "error_type": "overloaded"}``
    (router/src/infer/mod.rs, server.rs) or Triton's 503 ``{"error": "Exceeds
    maximum queue size"}`` (src/scheduler_utils.cc, sent as 503 by
    src/http_server.cc). ``concurrency`` None: no limit (the default).
    """

    model_config = ConfigDict(extra="forbid")

    concurrency: int | None = Field(default=None, ge=1, le=10_000)
    queue: int = Field(default=0, ge=0, le=100_000)
    service_ms: float = Field(default=0.0, ge=0, le=60_000, allow_inf_nan=False)
    overload: Literal["tgi", "triton"] = "tgi"


#: The "overloaded" answers, by Capacity.overload: (status, body).
OVERLOADED = {
    "tgi": (429, {"error": "Model is overloaded", "error_type": "overloaded"}),
    "triton": (503, {"error": "Exceeds maximum queue size"}),
}


class CapacityGate:
    """Calls served at once, a queue in arrival order, "overloaded" beyond (asyncio, one loop)."""

    def __init__(self) -> None:
        self.capacity = Capacity()
        self.serving = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def set(self, capacity: Capacity) -> None:
        """A new capacity, at once: a rolling deploy halves it, a scale-out doubles it."""
        self.capacity = capacity
        self._hand_over()

    async def enter(self) -> bool:
        """Wait for a turn to be served; False at once if the queue is full."""
        limit = self.capacity.concurrency
        if limit is None:
            self.serving += 1
            return True
        if self.serving < limit and not self._waiting:
            self.serving += 1
            return True
        if len(self._waiting) >= self.capacity.queue:
            return False
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:  # the client went away while waiting
            if turn.done() and not turn.cancelled():
                self.leave()  # the turn was handed over meanwhile: give it back
            else:
                self._waiting.remove(turn)
            raise
        return True

    def leave(self) -> None:
        self.serving -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        limit = self.capacity.concurrency
        while self._waiting and (limit is None or self.serving < limit):
            turn = self._waiting.popleft()
            if not turn.done():
                self.serving += 1
                turn.set_result(None)


class Phase(BaseModel):
    name: str = Field(min_length=1, max_length=64)


@dataclass
class PhaseStats:
    requests: int = 0
    ok: int = 0
    failed: int = 0
    #: Answered "overloaded" by the capacity (counted in failed too).
    overloaded: int = 0
    peak_in_flight: int = 0
    #: The most calls served at once (past the queue).
    peak_serving: int = 0


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
        #: Each request answered: when it arrived (epoch seconds), how long it took
        #: (seconds, a queue's wait included) and its status, for rates and
        #: latencies measured at the server.
        self.calls: list[tuple[float, float, int]] = []
        self.gate = CapacityGate()
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

    def answered(self, arrived: float, status: int) -> None:
        """Note an answered request (``arrived``: its time.time() on arrival)."""
        with self._lock:
            self.calls.append((arrived, time.time() - arrived, status))

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
