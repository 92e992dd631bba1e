"""The alert rules and the dashboard against a real Prometheus scraping a real worker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cbtasks import CircuitBreaker, RedisStore
from cbtasks._testing.processes import ROOT, CeleryWorker, ModelServer, client_app
from cbtasks._testing.redis_server import RedisServer, free_port, terminate
from tests.conftest import wait_for

FEATURES = [5.1, 3.5, 1.4, 0.2]
DEPLOY = ROOT / "deploy"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("promtool"), "promtool is missing: `make test` installs prometheus"
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, cwd=DEPLOY, timeout=120
    )


def test_the_alert_rules_are_valid() -> None:
    """promtool check rules: every rule parses, every expression is PromQL."""
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout


def test_each_alert_fires_on_what_it_watches() -> None:
    """promtool test rules: each alert fires on its series (and only then)."""
    tested = promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def queries() -> dict[str, str]:
    """Every dashboard panel's query, and every alert's query without its threshold."""
    found: dict[str, str] = {}
    dashboard = json.loads((DEPLOY / "grafana/dashboards/cbtasks.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for group in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            for i, part in enumerate(re.split(r"\s+and on \([^)]*\)\s+", rule["expr"])):
                query = re.sub(r"\s*(==|>=|<=|>|<)\s*[\d.]+\s*$", "", part)
                found[f"alert {rule['alert']} part {i}"] = query
    return found


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A worker with its metrics port, traffic that makes every series, and a Prometheus
    scraping it each second with the alert rules loaded."""
    logs = tmp_path_factory.mktemp("alerts")
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is missing: `make test` installs it"
    with RedisServer() as redis_server, ModelServer() as model:
        metrics_port, web_port = free_port(), free_port()
        env = {
            "CBTASKS_REDIS_URL": redis_server.url,
            "CBTASKS_MODEL_URL": model.url,
            "CBTASKS_METRICS_PORT": str(metrics_port),
        }
        worker = CeleryWorker(
            env,
            concurrency=3,
            queues="celery,pause-model",
            name="alerts",
            log_path=logs / "worker.log",
            app="tests.worker_tasks",
        ).start()
        data = Path(tempfile.mkdtemp(prefix="cbtasks-prometheus-"))
        config = data / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(DEPLOY / "alerts.yml")],
                    "scrape_configs": [
                        {
                            "job_name": "cbtasks-workers",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                        }
                    ],
                }
            )
        )
        with open(logs / "prometheus.log", "ab") as log:  # the child keeps its own copy
            server = subprocess.Popen(
                [
                    prometheus, f"--config.file={config}", f"--storage.tsdb.path={data / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{web_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        store = RedisStore(redis_server.url)
        try:
            traffic(redis_server.url, model, store)
            yield {
                "url": f"http://127.0.0.1:{web_port}",
                "store": store,
                "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            }
        finally:
            terminate(server)
            worker.stop()
            store.close()
            shutil.rmtree(data, ignore_errors=True)


def traffic(url: str, model: ModelServer, store: RedisStore) -> None:
    """What makes every series the dashboard and the alerts read: calls, a trip, deferrals,
    a fallback, a parked request, a paused queue with a backlog, limit refusals, overload."""
    app = client_app(url)
    sent = [app.send_task("workers.predict", (FEATURES,)) for _ in range(6)]
    model.faults(outage_seconds=2)
    sent += [app.send_task(name, (FEATURES,)) for name in ("workers.predict",) * 8]
    sent += [app.send_task("workers.predict_parked", (FEATURES,)) for _ in range(2)]
    wait_for(lambda: not model.stats()["down"], 30, "the outage to end")
    for result in sent:
        result.get(timeout=60)
    iris = CircuitBreaker("iris-model", store=store)
    iris.force_open()
    app.send_task("workers.predict_or_default", (FEATURES,)).get(timeout=60)
    iris.force_close()
    model.faults(latency_ms=200)
    limited = [app.send_task("tests.predict_limited", (FEATURES,)) for _ in range(6)]
    for result in limited:
        result.get(timeout=60)
    model.clear_faults()
    model.reset_stats()  # the outage's failures above are not the 429 waited for below
    model.faults(error_rate=1.0, status_code=429)  # TGI's "busy": overload, not failure
    app.send_task("tests.predict_limited", (FEATURES,))
    wait_for(lambda: model.stats()["requests"] > model.stats()["ok"], 30, "a 429")
    model.clear_faults()
    pause = CircuitBreaker("pause-model", store=store)
    pause.force_open()
    for _ in range(3):
        app.send_task("tests.predict_paused", (FEATURES,), queue="pause-model")


def query(base: str, expr: str) -> list[Any]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    response.raise_for_status()
    return list(response.json()["data"]["result"])


def test_every_panel_and_alert_query_returns_data(scraped: dict[str, Any]) -> None:
    """Each dashboard panel's query and each alert's watched series, asked of a real
    Prometheus that scraped a real worker: every one returns data (no name misspelt, no
    label that never comes)."""
    todo = queries()
    empty: dict[str, str] = dict(todo)

    def answered() -> bool:
        for name, expr in list(empty.items()):
            if query(scraped["url"], expr):
                del empty[name]
        return not empty

    def seen() -> dict[str, Any]:
        # What the worker serves of the series still missing, to tell a name Prometheus
        # never got from one it got and could not answer.
        served = httpx.get(scraped["metrics"], timeout=10).text.splitlines()
        wanted = set(re.findall(r"cbtasks_[a-z_]+", " ".join(empty.values())))
        return {"empty": empty, "served": [s for s in served if s.split("{")[0] in wanted]}

    wait_for(answered, 60, "every query to return data", seen=seen)
    assert len(todo) >= 20
