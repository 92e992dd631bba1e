"""Operations: the cbtasks CLI, batch inference and Prometheus metrics, on a real fleet."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from cbtasks import CircuitBreaker, RedisStore, State
from cbtasks._testing.processes import ROOT, CeleryWorker, ModelServer, client_app
from cbtasks._testing.redis_server import RedisServer, free_port
from cbtasks.ops.metrics import serve_store_metrics
from tests.conftest import wait_for

FEATURES = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("ops")
    with RedisServer() as redis_server, ModelServer() as model:
        metrics_port = free_port()
        env = {
            "CBTASKS_REDIS_URL": redis_server.url,
            "CBTASKS_MODEL_URL": model.url,
            "CBTASKS_METRICS_PORT": str(metrics_port),
        }
        worker = CeleryWorker(
            env,
            concurrency=2,
            queues="ops",
            name="ops",
            log_path=logs / "w.log",
            app="tests.worker_tasks",
        )
        worker.start()
        store = RedisStore(redis_server.url)
        try:
            yield {
                "redis": redis_server,
                "model": model,
                "env": env,
                "store": store,
                "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            }
        finally:
            worker.stop()
            store.close()


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cbtasks", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_status_lists_every_breaker(fleet: dict[str, Any]) -> None:
    """status shows each breaker; --json gives the same as data."""
    CircuitBreaker("model-a", store=fleet["store"]).call(lambda: None)
    CircuitBreaker("model-b", fail_max=1, store=fleet["store"]).call(lambda: None)
    url = fleet["redis"].url
    table = cli("status", "--redis-url", url)
    assert table.returncode == 0 and "model-a" in table.stdout and "closed" in table.stdout
    rows = json.loads(cli("status", "--json", env={"CBTASKS_REDIS_URL": url}).stdout)
    assert {"model-a", "model-b"} <= {row["name"] for row in rows}
    CircuitBreaker("model-a", store=fleet["store"]).force_open()
    lines = cli("status", "--redis-url", url).stdout.splitlines()
    assert "TRIPS" in lines[0]
    forced = next(line for line in lines if line.startswith("model-a"))
    assert "until closed" in forced  # not a time already past
    CircuitBreaker("model-b", fail_max=1, store=fleet["store"]).force_close()
    tripping = CircuitBreaker("model-b", fail_max=1, store=fleet["store"])
    for _ in range(2):  # two trips, a close between them: one in a row, two in all
        with contextlib.suppress(ZeroDivisionError):
            tripping.call(lambda: 1 / 0)
        assert tripping.state is State.OPEN
        if _ == 0:
            tripping.force_close()
    row = json.loads(cli("status", "--json", "--redis-url", url).stdout)
    b = next(r for r in row if r["name"] == "model-b")
    assert (b["trips"], b["trips_total"]) == (1, 2)
    shown = next(line for line in cli("status", "--redis-url", url).stdout.splitlines()
                 if line.startswith("model-b"))  # fmt: skip
    assert " 1/2 " in shown and re.search(r"\d\d:\d\d:\d\d \S+", shown), shown  # its zone
    help_text = cli("status", "--help").stdout
    assert "DEAD" in help_text and "ROW/ALL" in help_text
    CircuitBreaker("model-a", store=fleet["store"]).reset()


def test_open_close_reset_disable_are_cluster_wide(fleet: dict[str, Any]) -> None:
    """Commands change the shared state that every worker reads."""
    store, url = fleet["store"], fleet["redis"].url
    breaker = CircuitBreaker("model-c", store=store)
    breaker.call(lambda: None)
    refused = cli("open", "model-c", "--redis-url", url)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert breaker.state is State.CLOSED
    assert cli("open", "model-c", "--yes", "--redis-url", url).returncode == 0
    assert breaker.state is State.OPEN
    assert cli("close", "model-c", "--redis-url", url).returncode == 0
    assert breaker.state is State.CLOSED
    for verb in ("close", "reset", "disable", "enable"):  # the docs' --yes works everywhere
        assert cli(verb, "model-c", "--yes", "--redis-url", url).returncode == 0, verb
    disabled = json.loads(cli("disable", "model-c", "--json", "--redis-url", url).stdout)
    assert disabled["mode"] == "disabled"
    assert (
        json.loads(cli("reset", "model-c", "--json", "--redis-url", url).stdout)["mode"] == "normal"
    )


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("close", "no-such-breaker"), 1, "no breaker named"),
        # waited used to answer "no request has waited" for a name that is no breaker
        (("waited", "no-such-breaker"), 1, "no breaker named"),
        (("status", "--redis-url", "redis://127.0.0.1:1/0"), 2, "cannot reach Redis"),
        (("status", "--redis-url", "http://x"), 2, "redis://"),
        (("watch", "--interval", "-1"), 2, "'--interval': -1.0 is not in the range x>0"),
        (("watch", "--count", "0"), 2, "'--count': 0 is not in the range x>=1"),
        (("watch", "--count", "-1"), 2, "'--count': -1 is not in the range x>=1"),
        (("frobnicate",), 2, "No such command 'frobnicate'"),
    ],
)
def test_clear_errors_and_exit_codes(
    fleet: dict[str, Any], args: tuple[str, ...], code: int, words: str
) -> None:
    """Bad arguments, unknown breakers and unreachable Redis: a message and a non-zero exit."""
    result = cli(*args, env={"CBTASKS_REDIS_URL": fleet["redis"].url})
    assert result.returncode == code, result
    assert words in result.stderr


def test_help_everywhere() -> None:
    """--help works on every verb, and the console script is installed."""
    for verb in (
        "status",
        "open",
        "close",
        "reset",
        "disable",
        "enable",
        "watch",
        "waited",
        "batch",
        "metrics",
        "demo",
    ):
        assert cli(verb, "--help").returncode == 0
    assert (Path(sys.executable).parent / "cbtasks").exists()


def test_watch_shows_a_live_view(fleet: dict[str, Any]) -> None:
    """watch prints the table again and again (here: twice)."""
    CircuitBreaker("model-w", store=fleet["store"]).call(lambda: None)
    result = cli("watch", "--count", "2", "--interval", "0.1", "--redis-url", fleet["redis"].url)
    assert result.returncode == 0 and result.stdout.count("model-w") == 2


def _in_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """What ``cbtasks ARGS`` writes to a (pseudo-)terminal."""
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "cbtasks", *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**os.environ, **env, "COLUMNS": "160", "TERM": "xterm-256color"},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(60)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_tables_are_rich_on_a_terminal_and_plain_elsewhere(fleet: dict[str, Any]) -> None:
    CircuitBreaker("model-r", store=fleet["store"]).call(lambda: None)
    shown = _in_a_terminal(["status"], fleet["env"])
    assert "model-r" in shown and "\x1b[" in shown  # colour: rich drew it
    piped = cli("status", env=fleet["env"]).stdout
    assert "model-r" in piped and "\x1b[" not in piped
    assert piped.splitlines()[0].split() == [
        "NAME",
        "STATE",
        "MODE",
        "FAILURES",
        "TRIPS",
        "ROW/ALL",
        "OPEN",
        "UNTIL",
        "PROBES",
        "PARKED",
        "DEAD",
        "PAUSED",
        "LIMIT",
        "LAST",
        "FAILURE",
    ]


def test_batch_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("[1]\n[2]\n[3]\n")
    shown = _in_a_terminal(
        ["batch", str(source), "--task", "tests.batch_tasks.double", "--out", str(out)], {}
    )
    assert "━" in shown and "3/3" in shown, shown  # rich's bar and its count
    assert [json.loads(line)["result"] for line in out.read_text().splitlines()] == [2, 4, 6]


def test_celery_runs_the_same_verbs_with_the_apps_redis(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    """`celery -A proj cbtasks status`: the URL comes from the app's config, typed once."""
    CircuitBreaker("model-celery", store=fleet["store"]).call(lambda: None)
    (tmp_path / "proj.py").write_text(
        "from celery import Celery\n"
        "app = Celery('proj')\n"
        f"app.conf.cbtasks_redis_url = {fleet['redis'].url!r}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CBTASKS_REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "proj", "cbtasks", "status"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "model-celery" in result.stdout
    help_text = subprocess.run(
        [sys.executable, "-m", "celery", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    assert "cbtasks" in help_text


def test_watch_keeps_watching_while_redis_is_away(tmp_path: Path) -> None:
    """Redis stopped mid-watch: watch says it is unreachable, goes on, and sees it again."""
    with RedisServer() as server:
        store = RedisStore(server.url)
        CircuitBreaker("model-away", store=store).call(lambda: None)
        out = tmp_path / "watch.out"
        with out.open("w") as sink:
            watch = subprocess.Popen(
                [sys.executable, "-m", "cbtasks", "watch", "--interval", "0.2", "--count", "100"],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "CBTASKS_REDIS_URL": server.url},
            )
        try:
            wait_for(lambda: "model-away" in out.read_text(), 30, "the first view")
            server.stop()
            wait_for(lambda: "cannot reach Redis" in out.read_text(), 30, "the outage")
            server.start()
            CircuitBreaker("model-back", store=RedisStore(server.url)).call(lambda: None)
            wait_for(lambda: "model-back" in out.read_text(), 30, "the view after the outage")
            assert watch.wait(60) == 0
        finally:
            watch.kill()
            store.close()


def test_status_counts_failures_only_while_closed(fleet: dict[str, Any]) -> None:
    """An open circuit shows '-' for failures (it counts none), not a misleading 0."""
    breaker = CircuitBreaker("model-f", fail_max=2, store=fleet["store"])
    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)
    line = next(
        line for line in cli("status", env=fleet["env"]).stdout.splitlines() if "model-f" in line
    )
    assert line.split()[1:4] == ["closed", "normal", "1"]
    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)
    line = next(
        line for line in cli("status", env=fleet["env"]).stdout.splitlines() if "model-f" in line
    )
    assert line.split()[1:4] == ["open", "normal", "-"]


def test_batch_with_a_dead_broker_says_so_in_one_line(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("[1]\n[2]\n")
    result = cli("batch", str(source), "--task", "tests.batch_tasks.unsendable", "--out", str(out))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("cbtasks batch: cannot send row 1 to the broker (redis://")
    assert "secret" not in result.stderr and "rerun with the same --out" in message


def test_batch_says_why_it_waits_while_the_circuit_is_open(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    breaker = CircuitBreaker("iris-model", store=fleet["store"])
    breaker.reset()
    fleet["model"].clear_faults()
    breaker.force_open()
    source, out, log = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.log"
    source.write_text(json.dumps([FEATURES]) + "\n")
    command = [sys.executable, "-m", "cbtasks", "batch", str(source), "--queue", "ops"]
    command += ["--task", "workers.predict", "--out", str(out)]
    with log.open("w") as sink:
        batch = subprocess.Popen(command, stderr=sink, env={**os.environ, **fleet["env"]})
    try:
        wait_for(
            lambda: "circuit iris-model: OPEN by an operator, rows wait" in log.read_text(),
            60,
            "the circuit's state in the progress line",
        )
        breaker.force_close()
        assert batch.wait(60) == 0
        assert json.loads(out.read_text())["status"] == "ok"
    finally:
        batch.kill()


def test_batch_rides_an_outage_and_resumes(fleet: dict[str, Any], tmp_path: Path) -> None:
    """Every input row appears once in the output, through an outage and a resume."""
    model = fleet["model"]
    model.clear_faults()
    CircuitBreaker("iris-model", store=fleet["store"]).reset()
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [json.dumps([FEATURES]) for _ in range(120)]
    rows.insert(40, "{not json")
    source.write_text("\n".join(rows) + "\n")
    model.faults(outage_seconds=3)
    first = cli(
        "batch",
        str(source),
        "--task",
        "workers.app.predict",
        "--queue",
        "ops",
        "--out",
        str(out),
        "--chunk",
        "50",
        env=fleet["env"],
    )
    assert first.returncode == 1, first.stderr  # the malformed row failed
    assert "\r" not in first.stderr  # a log gets lines, not one endless carriage-return line
    assert "in.jsonl:41" in first.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["line"] for line in lines) == list(range(1, 122))
    assert sum(line["status"] == "ok" for line in lines) == 120

    # An interrupted run: keep the first 70 lines, and a torn one.
    kept = out.read_text().splitlines()[:70]
    out.write_text("\n".join(kept) + '\n{"line": 9')
    model.reset_stats()
    again = cli(
        "batch",
        str(source),
        "--task",
        "workers.app.predict",
        "--queue",
        "ops",
        "--out",
        str(out),
        env=fleet["env"],
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["line"] for line in lines) == list(range(1, 122))
    assert sum(line["status"] == "ok" for line in lines) == 120
    # Those rows ran before: the same file, line and content give the same task id,
    # and the completion guard answers them without calling the endpoint again.
    assert model.stats()["requests"] == 0, again.stderr


def test_batch_bad_arguments(tmp_path: Path) -> None:
    """A missing input file or a wrong task path says so."""
    result = cli(
        "batch",
        str(tmp_path / "nope.jsonl"),
        "--task",
        "workers.app.predict",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2 and "no input file" in result.stderr
    (tmp_path / "in.jsonl").write_text("[1]\n")
    result = cli(
        "batch", str(tmp_path / "in.jsonl"), "--task", "predict", "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "MODULE.TASK" in result.stderr


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all((k, labels[k]) in ls for k in labels)
    )


def test_worker_metrics_cover_the_whole_prefork_pool(fleet: dict[str, Any]) -> None:
    """Calls, rejections, deferrals and state, summed over the worker's processes."""
    app = client_app(fleet["redis"].url)
    breaker = CircuitBreaker("iris-model", store=fleet["store"])
    breaker.reset()
    fleet["model"].clear_faults()
    for result in [app.send_task("workers.predict", (FEATURES,), queue="ops") for _ in range(20)]:
        result.get(timeout=60)
    breaker.force_open()
    deferred = app.send_task("workers.predict", (FEATURES,), queue="ops")
    wait_for(
        lambda: _value(_scrape(fleet["metrics"]), "cbtasks_deferrals_total") >= 1, 30, "a deferral"
    )
    breaker.force_close()
    deferred.get(timeout=60)
    samples = _scrape(fleet["metrics"])
    assert _value(samples, "cbtasks_calls_total", outcome="success", breaker="iris-model") >= 21
    assert _value(samples, "cbtasks_calls_total", outcome="rejected") >= 1
    assert _value(samples, "cbtasks_breaker_state", breaker="iris-model", state="closed") == 1
    # How long the endpoint took, for calls made (rejections take none) ...
    calls_timed = _value(
        samples, "cbtasks_call_duration_seconds_count", breaker="iris-model", outcome="success"
    )
    assert calls_timed == _value(
        samples, "cbtasks_calls_total", outcome="success", breaker="iris-model"
    )
    # ... and how long the deferred request waited for its circuit.
    assert _value(samples, "cbtasks_deferral_wait_seconds_count", mode="countdown") >= 1
    assert _value(samples, "cbtasks_deferral_wait_seconds_sum", mode="countdown") > 0


def test_cbtasks_metrics_serves_fleet_state(fleet: dict[str, Any]) -> None:
    """The state gauges come from Redis: any process shows the fleet's truth."""
    breaker = CircuitBreaker("model-m", fail_max=1, store=fleet["store"])
    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)
    port = free_port()
    serve_store_metrics(fleet["store"], port)
    samples = _scrape(f"http://127.0.0.1:{port}/metrics")
    assert _value(samples, "cbtasks_breaker_state", breaker="model-m", state="open") == 1
    assert _value(samples, "cbtasks_breaker_trips_in_a_row", breaker="model-m") == 1
    assert _value(samples, "cbtasks_breaker_mode", breaker="model-m", mode="normal") == 1
    breaker.disable()  # shadow mode: exported as the mode, whatever the state
    samples = _scrape(f"http://127.0.0.1:{port}/metrics")
    assert _value(samples, "cbtasks_breaker_mode", breaker="model-m", mode="disabled") == 1
    assert _value(samples, "cbtasks_breaker_mode", breaker="model-m", mode="normal") == 0
    breaker.force_open()
    samples = _scrape(f"http://127.0.0.1:{port}/metrics")
    assert _value(samples, "cbtasks_breaker_mode", breaker="model-m", mode="forced_open") == 1


def test_flower_shows_deferred_and_fallback_tasks(fleet: dict[str, Any], tmp_path: Path) -> None:
    """A real Flower (basic auth): a deferred task reads CIRCUIT_OPEN, a fallback is marked."""
    from cbtasks._testing.processes import Flower

    flower = Flower(fleet["env"]).start(log_path=tmp_path / "flower.log")
    try:
        assert httpx.get(f"{flower.url}/api/tasks", timeout=10).status_code == 401
        app = client_app(fleet["redis"].url)
        breaker = CircuitBreaker("iris-model", store=fleet["store"])
        breaker.reset()
        breaker.force_open()
        deferred = app.send_task("workers.predict", (FEATURES,), queue="ops")
        answered = app.send_task("workers.predict_or_default", (FEATURES,), queue="ops")
        assert answered.get(timeout=60)["cbtasks_fallback"] == "default"

        def flower_task(task_id: str) -> dict[str, Any]:
            response = httpx.get(
                f"{flower.url}/api/task/info/{task_id}", auth=flower.auth, timeout=10
            )
            return response.json() if response.status_code == 200 else {}

        wait_for(
            lambda: flower_task(deferred.id).get("state") == "CIRCUIT_OPEN",
            60,
            "CIRCUIT_OPEN in Flower",
        )
        wait_for(
            lambda: "cbtasks_fallback" in str(flower_task(answered.id).get("result")),
            60,
            "the fallback",
        )

        def page(task_id: str) -> str:
            response = httpx.get(f"{flower.url}/task/{task_id}", auth=flower.auth, timeout=10)
            return response.text if response.status_code == 200 else ""

        # The rendered task page says why it waits, on which breaker, and how.
        wait_for(
            lambda: (
                "forced open by an operator (breaker iris-model): deferred" in page(deferred.id)
            ),
            60,
            "the reason on Flower's task page",
        )
        assert "by countdown, deferral " in page(deferred.id)
        breaker.force_close()
        deferred.get(timeout=60)
        wait_for(
            lambda: flower_task(deferred.id).get("state") == "SUCCESS", 60, "SUCCESS in Flower"
        )
    finally:
        flower.stop()


def test_dashboard_queries_name_metrics_the_workers_export(fleet: dict[str, Any]) -> None:
    """Every metric the Grafana dashboard queries is in a live worker's /metrics."""
    from tests.test_deploy import dashboard_metric_names

    app = client_app(fleet["redis"].url)
    breaker = CircuitBreaker("iris-model", store=fleet["store"])
    breaker.reset()
    fleet["model"].faults(outage_seconds=2)  # the worker trips, defers, recovers
    for result in [app.send_task("workers.predict", (FEATURES,), queue="ops") for _ in range(12)]:
        result.get(timeout=60)
    breaker.force_open()
    app.send_task("workers.predict_or_default", (FEATURES,), queue="ops").get(timeout=60)
    breaker.force_close()
    # A breaker with a limit: the limit's gauges.
    app.send_task("tests.predict_limited", (FEATURES,), queue="ops").get(timeout=60)
    exported = {name for name, _ in _scrape(fleet["metrics"])}
    missing = dashboard_metric_names() - exported
    assert not missing, f"the dashboard queries metrics no worker exports: {missing}"


def test_batch_finds_tasks_as_the_readme_names_them() -> None:
    """MODULE.TASK or the registered name, from the project's root, as `celery -A` would
    (the `cbtasks` script does not have the working directory on its path: -P here)."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "from cbtasks.ops.batch import BatchError, load_task\n"
        "print(load_task('workers.app.predict').name, load_task('workers.predict').name)\n"
        "try:\n    load_task('workers.nope')\nexcept BatchError as exc:\n    print(exc)\n"
    )
    found = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert lines[0] == "workers.predict workers.predict"
    assert "no task 'nope'" in lines[1]


def _batch(tmp_path: Path, rows: str, out: Path | None = None) -> tuple[int, list[dict[str, Any]]]:
    from cbtasks.ops.batch import _run

    source = tmp_path / "rows.jsonl"
    source.write_text(rows)
    out = out or tmp_path / "out.jsonl"
    code = _run(source, out, "tests.batch_tasks.double", 10, 5.0, None)
    return code, [json.loads(line) for line in out.read_text().splitlines()]


def test_batch_rows_that_cannot_run_are_reported_and_the_rest_goes_on(tmp_path: Path) -> None:
    """[1,2,3], {"bogus": 1} and JSON nested 100,000 deep: a failed line each, no traceback."""
    deep = "[" * 100_000 + "]" * 100_000
    code, lines = _batch(tmp_path, f'[1]\n[1, 2, 3]\n{{"bogus": 1}}\n{deep}\n{{"x": 4}}\n')
    by_line = {line["line"]: line for line in lines}
    assert by_line[1] == {"line": 1, "status": "ok", "result": 2}
    assert by_line[5] == {"line": 5, "status": "ok", "result": 8}
    assert all(by_line[n]["status"] == "failed" for n in (2, 3, 4))
    assert code == 1


def test_batch_refuses_its_input_as_output_and_keeps_whole_lines(tmp_path: Path) -> None:
    """--out at the input is refused (it used to lose a line); a last line without a newline
    that is whole is kept, and resuming sends the same rows with the same task ids."""
    from cbtasks.ops.batch import BatchError, row_task_id
    from tests import batch_tasks

    source = tmp_path / "rows.jsonl"
    source.write_text("[1]\n[2]")
    with pytest.raises(BatchError, match="is the input"):
        _batch(tmp_path, "[1]\n[2]", out=source)
    assert source.read_text() == "[1]\n[2]"
    out = tmp_path / "out.jsonl"
    out.write_text('{"line": 1, "status": "ok", "result": 2}')  # no newline at the end
    _, lines = _batch(tmp_path, "[1]\n[2]\n", out=out)
    assert [line["line"] for line in lines] == [1, 2]
    assert row_task_id(source, 2, "[2]") == row_task_id(source, 2, "[2]")
    assert row_task_id(source, 2, "[2]") != row_task_id(source, 2, "[3]")
    assert batch_tasks.calls[-1] == row_task_id(source, 2, "[2]")


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=300))
def test_the_batch_readers_take_any_bytes(tmp_path: Path, data: bytes) -> None:
    """An input row or an output file of arbitrary bytes: a row, or a clear error; nothing else."""
    from cbtasks.ops.batch import BatchError, done_lines, parse_row

    text = data.decode(errors="replace")
    try:
        args, kwargs = parse_row(text)
    except ValueError:
        pass
    else:
        assert isinstance(args, tuple) and isinstance(kwargs, dict)
    out = tmp_path / "out.jsonl"
    out.write_bytes(data)
    try:
        done = done_lines(out)
    except BatchError:
        return
    assert all(isinstance(n, int) for n in done)


def test_batch_gives_up_on_a_row_after_its_timeout(tmp_path: Path) -> None:
    """No worker consuming: each row fails after --timeout, saying why, instead of waiting."""
    from cbtasks.ops.batch import _run

    source = tmp_path / "rows.jsonl"
    source.write_text("[1]\n[2]\n")
    out = tmp_path / "out.jsonl"
    assert _run(source, out, "tests.batch_tasks.never", 10, 0.3, None) == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["status"] for line in lines] == ["failed", "failed"]
    assert "no answer in 0.3s" in lines[0]["error"]


def test_batch_interrupted_says_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C: one line that says how to resume, exit code 130, no traceback."""
    from cbtasks.ops import batch

    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "_run", interrupted)
    assert batch.run_batch(input="rows.jsonl", out="out.jsonl", task="t.t") == 130
    assert "rerun with the same --out" in capsys.readouterr().err


def readme_operations() -> list[str]:
    """The command lines of the docs' "Operating a fleet" block, comments dropped."""
    readme = (ROOT / "docs" / "operations.md").read_text()
    section = readme[readme.index("# Operating a fleet") :]
    block = section[section.index("```sh") + 5 : section.index("```", section.index("```sh") + 5)]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


def test_the_readme_operations_section_word_for_word(fleet: dict[str, Any], tmp_path: Path) -> None:
    """Each line of the README's block, run as written from the repo root (the export
    pointing at this test's Redis). `metrics` is scraped and stopped; `demo` has its own test."""
    lines = readme_operations()
    assert lines[0].startswith("export CBTASKS_REDIS_URL=")
    CircuitBreaker("iris-model", store=fleet["store"]).reset()
    fleet["model"].clear_faults()
    env = {k: v for k, v in fleet["env"].items() if k != "CBTASKS_METRICS_PORT"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    worker = CeleryWorker(env, concurrency=1, name="readme", log_path=tmp_path / "w.log").start()
    results = ROOT / "results.jsonl"
    results.unlink(missing_ok=True)
    try:
        CircuitBreaker("iris-model", store=fleet["store"]).call(lambda: None)
        for line in lines[1:]:
            words = line.split()
            if words[:2] == ["cbtasks", "demo"]:
                continue  # tests/test_demo.py runs the demo
            if words[:2] == ["cbtasks", "metrics"]:
                _serves_metrics(line, env)
                continue
            done = subprocess.run(
                line, shell=True, cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                text=True, timeout=120, check=False,
            )  # fmt: skip
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            if words[1:2] == ["status"]:
                assert "iris-model" in done.stdout, line
        answers = [json.loads(row) for row in results.read_text().splitlines()]
        assert sorted(a["line"] for a in answers) == [1, 2, 3]
        assert all(a["status"] == "ok" for a in answers), answers
    finally:
        worker.stop()
        results.unlink(missing_ok=True)


def _serves_metrics(line: str, env: dict[str, str]) -> None:
    port = line.split("--port")[1].split()[0]
    server = subprocess.Popen(
        line, shell=True, cwd=ROOT, env={**os.environ, **env}, start_new_session=True
    )

    def serving() -> bool:
        try:
            samples = _scrape(f"http://127.0.0.1:{port}/metrics")
        except httpx.TransportError:
            return False
        return _value(samples, "cbtasks_breaker_state", breaker="iris-model") > 0

    try:
        wait_for(serving, 30, "the metrics server")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)


def test_a_tasks_own_retries_are_each_counted_once(fleet: dict[str, Any]) -> None:
    """cbtasks_calls_total counts every run of a task: its own retries too (each run that
    raised Retry was recorded by the breaker but missing from the metrics)."""
    app = client_app(fleet["redis"].url)
    CircuitBreaker("iris-model", store=fleet["store"]).reset()

    def counted(outcome: str) -> float:
        samples = _scrape(fleet["metrics"])
        return _value(samples, "cbtasks_calls_total", outcome=outcome, breaker="iris-model")

    def serving() -> bool:
        try:
            return httpx.get(fleet["metrics"], timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(serving, 30, "the worker's metrics")
    ignored, succeeded = counted("ignored"), counted("success")
    result = app.send_task("tests.retry_twice", queue="ops").get(timeout=60)
    assert result["retries"] == 2
    # Two runs that asked for a retry of their own (no cause: neither success nor
    # failure), one that succeeded: three calls, each counted once.
    wait_for(lambda: counted("ignored") - ignored == 2, 10, "the two retried runs counted")
    assert counted("success") - succeeded == 1
