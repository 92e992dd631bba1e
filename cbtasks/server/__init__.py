"""The reference model server: a real scikit-learn model behind FastAPI, with fault injection.

    python -m cbtasks.server [--host 127.0.0.1] [--port 8000] [--grpc-port N]

A logistic regression is trained at start-up on the iris data set that ships
with scikit-learn (no downloads). Endpoints:

- ``POST /predict`` ``{"features": [4 numbers]}`` -> ``{"label", "probabilities"}``
- ``GET /healthz``: 200, or 503 during an injected outage (not for an error rate)
- with ``--grpc-port``, the same model and faults as the gRPC method
  ``/cbtasks.Model/Predict`` (JSON messages; see ``cbtasks.server.grpc``)
- ``PUT /admin/faults`` sets error rate, added latency, an outage for N
  seconds, the status code to answer and the Retry-After to send;
  ``DELETE /admin/faults`` clears them.
- ``GET /admin/stats`` counts the requests it got, per phase, with peak
  concurrency; ``PUT /admin/phase`` names the phase that counting goes to;
  ``DELETE /admin/stats`` starts over.

Tests, the demo and the benchmarks read exactly what reached the model here.

Modules: ``_model`` (the model, faults and counts), ``http`` (the FastAPI
app), ``grpc`` (the gRPC service), ``__main__`` (the command).
"""

from ._model import FEATURES, Faults, IrisModel, ServerState
from .http import create_app

__all__ = ["FEATURES", "Faults", "IrisModel", "ServerState", "create_app"]
