"""The model servers that install from PyPI, real: MLServer (scikit-learn runtime) and KServe.

They live in ``.venv-servers`` (their pins do not fit the project's; ``make
test`` builds it from tests/servers/requirements.txt) and run as processes of
their own on free ports. Each case is four calls through a default
``CircuitBreaker(fail_max=3, reset_timeout=30)`` with cbtasks' HTTP client.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cbtasks import CallerError, CircuitBreaker, CircuitOpenError, EndpointFailure, State
from cbtasks._testing.redis_server import free_port, terminate
from cbtasks.clients import HTTPModelClient
from tests.conftest import wait_for

pytestmark = pytest.mark.real_servers

ROOT = Path(__file__).resolve().parents[1]
SERVERS_VENV = Path(os.environ.get("CBTASKS_SERVERS_VENV", ROOT / ".venv-servers"))
SERVERS_PYTHON = SERVERS_VENV / "bin" / "python"


def servers_python() -> Path:
    if not SERVERS_PYTHON.exists():
        pytest.fail(
            f"{SERVERS_PYTHON} is missing: `make test` (or `make servers-venv`) installs "
            "MLServer and KServe there from tests/servers/requirements.txt"
        )
    return SERVERS_PYTHON


def started(command: list[str], ready_url: str, log: Path, timeout: float = 90.0) -> Any:
    """A server process, once ``ready_url`` answers 200; its output goes to ``log``."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{command[0]} exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    terminate(process)
    pytest.fail(f"{ready_url} was not ready within {timeout}s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    python = servers_python()
    folder = tmp_path_factory.mktemp("mlserver")
    http, grpc, metrics = free_port(), free_port(), free_port()
    subprocess.run(
        [
            python,
            ROOT / "tests/servers/mlserver_iris.py",
            folder,
            str(http),
            str(grpc),
            str(metrics),
        ],
        check=True,
    )
    url = f"http://127.0.0.1:{http}"
    process = started(
        [str(python), "-m", "mlserver.cli.main", "start", str(folder)],
        f"{url}/v2/models/iris/ready",
        folder / "mlserver.log",
    )
    yield url
    terminate(process)


@pytest.fixture(scope="module")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    python = servers_python()
    folder = tmp_path_factory.mktemp("kserve")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = started(
        [str(python), str(ROOT / "tests/servers/kserve_iris.py"), "--http_port", str(port)],
        f"{url}/v1/models/iris",
        folder / "kserve.log",
    )
    wait_for(
        lambda: httpx.get(f"{url}/v1/models/loading", timeout=1).status_code == 503,
        timeout=30,
        what="the 'loading' model to go not-ready",
    )
    yield url
    terminate(process)


def four_predictions(client: HTTPModelClient, payload: Any, path: str) -> tuple[State, set[type]]:
    breaker = CircuitBreaker(fail_max=3, reset_timeout=30)
    raised: set[type] = set()
    for _ in range(4):
        try:
            breaker.call(client.predict, payload, path=path)
        except CircuitOpenError:
            raised.add(CircuitOpenError)
        except Exception as exc:
            raised.add(type(exc))
    return breaker.state, raised


def v2_request(data: list[Any], datatype: str = "FP32", shape: list[int] | None = None) -> Any:
    return {"inputs": [{"name": "x", "shape": shape or [1, 4], "datatype": datatype, "data": data}]}


# -- MLServer ------------------------------------------------------------------------


def test_mlserver_answers_a_good_request(mlserver: str) -> None:
    """The real model answers; the circuit stays closed."""
    with HTTPModelClient(mlserver, profile="mlserver") as client:
        answer = client.predict(v2_request([5.1, 3.5, 1.4, 0.2]), path="/v2/models/iris/infer")
        assert answer["outputs"][0]["data"] == [0]
        assert client.healthy() is True


def test_mlserver_bad_datatype_is_the_callers(mlserver: str) -> None:
    """A datatype MLServer does not know: 422 from its request validation."""
    with HTTPModelClient(mlserver, profile="mlserver") as client:
        state, raised = four_predictions(
            client, v2_request([1, 2, 3, 4], datatype="NOPE"), "/v2/models/iris/infer"
        )
    assert (state, raised) == (State.CLOSED, {CallerError})


def test_mlserver_unknown_model_is_the_callers(mlserver: str) -> None:
    """An unknown model: 404 (the same 404 as an unloaded one: see docs/endpoints.md)."""
    with HTTPModelClient(mlserver, profile="mlserver") as client:
        state, raised = four_predictions(client, v2_request([1, 2, 3, 4]), "/v2/models/nope/infer")
    assert (state, raised) == (State.CLOSED, {CallerError})


def test_mlserver_bad_shape_is_counted_as_the_endpoints(mlserver: str) -> None:
    """MLServer answers a shape the model cannot take with 500 and a traceback: no client can
    tell it from a crash, so it counts (docs/endpoints.md says so)."""
    with HTTPModelClient(mlserver, profile="mlserver") as client:
        state, raised = four_predictions(
            client, v2_request([1, 2, 3], shape=[1, 3]), "/v2/models/iris/infer"
        )
    assert (state, raised) == (State.OPEN, {EndpointFailure, CircuitOpenError})


# -- KServe ----------------------------------------------------------------------------


def test_kserve_answers_a_good_request(kserve: str) -> None:
    """The v1 protocol's predict answers; the v2 readiness path says ready."""
    with HTTPModelClient(kserve, profile="kserve") as client:
        answer = client.predict(
            {"instances": [[5.1, 3.5, 1.4, 0.2]]}, path="/v1/models/iris:predict"
        )
        assert answer == {"predictions": [0]}
        assert client.healthy() is True


def test_kserve_invalid_input_is_the_callers(kserve: str) -> None:
    """InvalidInput: 400 (kserve/errors.py, invalid_input_handler)."""
    with HTTPModelClient(kserve, profile="kserve") as client:
        state, raised = four_predictions(client, {"instances": [[1, 2]]}, "/v1/models/iris:predict")
    assert (state, raised) == (State.CLOSED, {CallerError})


def test_kserve_model_not_ready_opens_the_circuit(kserve: str) -> None:
    """A model that has not loaded: 503 (ModelNotReady)."""
    with HTTPModelClient(kserve, profile="kserve") as client:
        state, raised = four_predictions(
            client, {"instances": [[1, 2, 3, 4]]}, "/v1/models/loading:predict"
        )
    assert (state, raised) == (State.OPEN, {EndpointFailure, CircuitOpenError})


def test_kserve_an_error_in_predict_opens_the_circuit(kserve: str) -> None:
    """An exception in the model's predict: 500 (generic_exception_handler)."""
    with HTTPModelClient(kserve, profile="kserve") as client:
        state, raised = four_predictions(
            client, {"instances": [[-1, 2, 3, 4]]}, "/v1/models/iris:predict"
        )
    assert (state, raised) == (State.OPEN, {EndpointFailure, CircuitOpenError})
