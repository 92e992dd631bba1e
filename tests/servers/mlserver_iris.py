"""Lay out an MLServer model repository serving a scikit-learn iris model.

Run from .venv-servers: ``python tests/servers/mlserver_iris.py DIR HTTP GRPC METRICS``
trains the model with that environment's scikit-learn (so the saved file
matches the runtime that loads it), writes MLServer's settings.json and
model-settings.json, and the tests then start ``mlserver start DIR``.
"""

from __future__ import annotations

import json
import pathlib
import sys

import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression


def main(folder: str, http_port: str, grpc_port: str, metrics_port: str) -> None:
    root = pathlib.Path(folder)
    model_dir = root / "iris"
    model_dir.mkdir(parents=True, exist_ok=True)
    features, labels = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=500).fit(features, labels), model_dir / "model.joblib")
    (root / "settings.json").write_text(
        json.dumps(
            {
                "http_port": int(http_port),
                "grpc_port": int(grpc_port),
                "metrics_port": int(metrics_port),
                # One process: the tests need no inference pool.
                "parallel_workers": 0,
            }
        )
    )
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "iris",
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": "v1"},
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
