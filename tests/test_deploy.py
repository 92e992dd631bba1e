"""docker-compose.yml and its Prometheus and Grafana configs, checked statically (no Docker)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_compose_has_the_whole_stack() -> None:
    """Redis, the model server, two workers, the gateway, Flower, Prometheus and Grafana."""
    services = compose()["services"]
    assert {
        "redis", "model", "worker-1", "worker-2", "gateway", "flower", "prometheus", "grafana"
    } <= set(services)  # fmt: skip
    for name, service in services.items():
        assert "image" in service or "build" in service, name


def test_every_command_refers_to_something_in_the_repo() -> None:
    """Each `celery -A X` app module and `python -m X` module exists; the Dockerfile copies them."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name, service in compose()["services"].items():
        if "build" not in service:
            continue
        assert (ROOT / service["build"] / "Dockerfile").exists(), name
        words = shlex.split(service["command"])
        if words[0] == "celery":
            module = words[words.index("-A") + 1]
        elif words[0] == "uvicorn":
            module = words[1].split(":")[0]
        else:
            assert words[:2] == ["python", "-m"], name
            module = words[2]
        base = ROOT / module.replace(".", "/")
        path = next(
            (p for p in (base.with_suffix(".py"), base / "__main__.py") if p.exists()), None
        )
        assert path is not None, f"{name}: {module} is not in the repo"
        assert f"COPY {path.relative_to(ROOT).parts[0]}" in dockerfile, (
            f"{name}: not copied into the image"
        )
    # COPY --from=<stage> copies between stages, not from the repo.
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M):
        assert (ROOT / source).exists(), source


def test_prometheus_scrapes_the_workers_and_flower() -> None:
    """Targets are compose services, on the ports they serve metrics on."""
    services = compose()["services"]
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    metrics_port = services["worker-1"]["environment"]["CBTASKS_METRICS_PORT"]
    assert {f"worker-1:{metrics_port}", f"worker-2:{metrics_port}"} <= targets
    flower_port = re.search(r"--port=(\d+)", services["flower"]["command"])
    assert flower_port and f"flower:{flower_port.group(1)}" in targets
    flower_job = next(job for job in config["scrape_configs"] if job["job_name"] == "flower")
    user = re.search(r"--basic-auth=([^:\s]+):", services["flower"]["command"])
    assert user and flower_job["basic_auth"]["username"] == user.group(1)
    # The password comes from the file compose makes from .env, never from a tracked file.
    password_file = flower_job["basic_auth"]["password_file"]
    targets_of = {c["target"]: c["source"] for c in services["prometheus"]["configs"]}
    assert "FLOWER_PASSWORD" in compose()["configs"][targets_of[password_file]]["content"]
    mount = services["prometheus"]["volumes"][0].split(":")[0]
    assert (ROOT / mount).resolve() == (ROOT / "deploy/prometheus.yml").resolve()


def test_grafana_provisioning_parses_and_points_at_the_dashboard() -> None:
    """Datasource and dashboard provider parse; the provider's folder is the mounted dashboards."""
    grafana = compose()["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    provisioning = ROOT / "deploy/grafana/provisioning"
    datasource = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards/cbtasks.yml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    local = next(src for src, dst in mounts.items() if dst == dashboards_dir)
    assert list((ROOT / local).glob("*.json"))


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/cbtasks.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 4
    return {name for expr in exprs for name in re.findall(r"\bcbtasks_[a-z_]+", expr)}


def test_dashboard_covers_what_the_issue_asks() -> None:
    """State over time, calls short-circuited, deferrals, parked backlog."""
    names = dashboard_metric_names()
    assert {"cbtasks_breaker_state", "cbtasks_calls_total", "cbtasks_deferrals_total"} <= names
    assert "cbtasks_breaker_parked_requests" in names


def test_no_secret_in_tracked_files_and_nothing_needless_published() -> None:
    """Passwords come from .env (untracked; .env.example tracked and empty), Redis has one
    and persists, only the operator UIs are published, on loopback, and /admin wants a token."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert (
        "change-me" not in text and "change-me" not in (ROOT / "deploy/prometheus.yml").read_text()
    )
    services = compose()["services"]
    redis_command = services["redis"]["command"]
    assert "--requirepass ${REDIS_PASSWORD" in redis_command
    assert "--appendonly yes" in redis_command and "--appendfsync everysec" in redis_command
    assert "redis-data:/data" in services["redis"]["volumes"]
    assert ":${REDIS_PASSWORD" in services["worker-1"]["environment"]["CBTASKS_REDIS_URL"]
    published = {name: s.get("ports", []) for name, s in services.items() if s.get("ports")}
    assert set(published) == {"gateway", "flower", "prometheus", "grafana"}
    assert all(port.startswith("127.0.0.1:") for ports in published.values() for port in ports)
    assert "MODEL_ADMIN_TOKEN" in services["model"]["environment"]["CBTASKS_ADMIN_TOKEN"]
    assert (
        "GRAFANA_ADMIN_PASSWORD" in services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    )
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(example) == {
        "REDIS_PASSWORD", "FLOWER_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "MODEL_ADMIN_TOKEN"
    }  # fmt: skip
    assert all(value == "" for value in example.values())
    assert ".env" in (ROOT / ".gitignore").read_text().split()
