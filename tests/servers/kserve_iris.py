"""A KServe python ModelServer with two models, run from .venv-servers by the tests.

``iris`` answers predictions (v1 protocol: POST /v1/models/iris:predict);
``loading`` goes not-ready a second after the start, as a model being
reloaded does, and KServe answers it 503 (ModelNotReady). (KServe registers
only the models that are ready when it starts.)
An instance whose first number is negative makes predict raise, which KServe
answers 500; instances that are not lists of four numbers are InvalidInput (400).

    python tests/servers/kserve_iris.py --http_port 8080
"""

from __future__ import annotations

import threading
from typing import Any

import kserve
from kserve.errors import InvalidInput


class Iris(kserve.Model):  # type: ignore[misc]
    def __init__(self, name: str, *, ready: bool) -> None:
        super().__init__(name)
        self.ready = ready

    def predict(self, payload: Any, headers: Any = None) -> dict[str, Any]:
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not all(
            isinstance(row, list) and len(row) == 4 and all(isinstance(x, int | float) for x in row)
            for row in instances
        ):
            raise InvalidInput("instances must be lists of 4 numbers")
        if any(row[0] < 0 for row in instances):
            raise RuntimeError("the model crashed on a negative sepal length")
        return {"predictions": [0 for _ in instances]}


if __name__ == "__main__":
    # KServe reads --http_port and its other flags from sys.argv itself.
    reloading = Iris("loading", ready=True)
    threading.Timer(1.0, setattr, (reloading, "ready", False)).start()
    kserve.ModelServer(enable_grpc=False, workers=1).start([Iris("iris", ready=True), reloading])
