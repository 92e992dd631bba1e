"""Every Python block in the README and the docs runs, as written.

A page's blocks are one program, run in order in a process of its own from a
folder outside the repository (cbtasks as installed), against a Redis and the
reference model server this test starts: the examples name ``localhost:6379``
and ``localhost:8000``, which are pointed at those. A page whose blocks are
tests (``def test_``) is run by pytest, as its reader would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cbtasks._testing.processes import CeleryWorker, ModelServer
from cbtasks._testing.redis_server import RedisServer
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(page: Path) -> list[str]:
    return _BLOCK.findall(page.read_text())


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    with RedisServer() as redis_server, ModelServer() as model:
        yield {
            "redis": redis_server.url.removeprefix("redis://").split("/")[0],
            "model": model.url.removeprefix("http://"),
            "redis_url": redis_server.url,
            "model_url": model.url,
            "token": model.admin_token,
        }


def pointed(code: str, servers: dict[str, str]) -> str:
    """The example's own hosts, pointed at this test's servers."""
    return code.replace("localhost:6379", servers["redis"]).replace(
        "localhost:8000", servers["model"]
    )


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_every_python_block_runs_as_written(
    page: Path, servers: dict[str, str], tmp_path: Path
) -> None:
    """The page's blocks, in order, as one program: it runs to its end."""
    code = pointed("\n\n".join(python_blocks(page)), servers)
    env = {**os.environ, "PYTHONPATH": ""}
    if "def test_" in code:
        (tmp_path / "test_page.py").write_text(code)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "celery.contrib.pytest",
                   "-p", "no:cacheprovider", "test_page.py"]  # fmt: skip
    else:
        (tmp_path / "page.py").write_text(code)
        command = [sys.executable, "page.py"]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"{page.name}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_the_first_app_runs_as_the_page_says(
    servers: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/first-app.md: its app.py, a worker started as it says, a prediction, the outage
    it injects with its curl line (the circuit opens and says why), and every request
    answered once the model is back."""
    page = (ROOT / "docs" / "first-app.md").read_text()
    (tmp_path / "app.py").write_text(python_blocks(ROOT / "docs" / "first-app.md")[0])
    env = {"REDIS_URL": servers["redis_url"], "MODEL_URL": servers["model_url"], "PYTHONPATH": ""}
    assert "celery -A app worker -l info" in page
    worker = CeleryWorker(
        env, concurrency=2, queues=None, app="app", cwd=tmp_path, log_path=tmp_path / "w.log"
    ).start()
    monkeypatch.syspath_prepend(str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        import app as first  # type: ignore[import-not-found]

        features = [5.1, 3.5, 1.4, 0.2]
        assert first.predict.delay(features).get(timeout=60)["label"] == "setosa"
        injected = re.search(r"-d '(\{.*?\})'", page)
        assert injected is not None
        response = httpx.put(
            f"{servers['model_url']}/admin/faults",
            headers={
                "Authorization": f"Bearer {servers['token']}",
                "Content-Type": "application/json",  # as the page's curl line sends it
            },
            content=injected.group(1).replace("30", "4"),  # the page's outage, shorter
        )
        assert response.status_code == 200, response.text
        results = [first.predict.delay(features) for _ in range(10)]
        wait_for(lambda: "closed -> open" in (tmp_path / "w.log").read_text(), 30, "the trip")
        assert "last failure: EndpointFailure" in (tmp_path / "w.log").read_text()
        assert all(r.get(timeout=90)["label"] == "setosa" for r in results)
    finally:
        worker.stop()
        sys.modules.pop("app", None)


def test_every_task_option_is_in_the_options_table() -> None:
    """docs/tasks.md's table names every option a CircuitBreakerTask reads, and only
    those, and each is a declared attribute of the class (its TaskOption entry, whose doc
    the table shows): an option added in one place and not the others fails here (the
    table lacked pause_in_hand, completion_check, classify, health_timeout, on_error
    and prefix)."""
    from cbtasks import CircuitBreakerTask
    from cbtasks.task._options import DEFAULTS

    page = (ROOT / "docs" / "tasks.md").read_text()
    table = page[page.index("| option | default | meaning |") :].split("\n\n", 1)[0]
    documented = {
        name
        for row in table.splitlines()[2:]
        for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])
    }
    expected = set(DEFAULTS) | {"breaker", "breaker_policy", "fallback", "limit"}
    assert documented == expected, (
        f"missing from the table: {sorted(expected - documented)}; "
        f"not options: {sorted(documented - expected)}"
    )
    app_wide = {"prefix", "on_error"}  # app.conf.cbtasks_<name>, or a decorator option
    undeclared = [n for n in expected - app_wide if not hasattr(CircuitBreakerTask, n)]
    assert not undeclared, f"options not declared on CircuitBreakerTask: {undeclared}"
