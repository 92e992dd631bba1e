"""The layout stays readable: no import cycles.

Modules are sized by their concept, not by a line count (a cap split the
breaker into mixins once): there is no length rule here on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cbtasks", "workers", "bench")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # The module itself, else the nearest package of ours that holds it.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def test_no_import_cycles() -> None:
    """No module of cbtasks, workers or bench imports one that imports it back."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


#: Layers, lowest first: a module may import its own layer's and lower ones only.
LAYERS = (
    ("cbtasks._state", "cbtasks._errors", "cbtasks._limit", "cbtasks._policy"),
    ("cbtasks._machine", "cbtasks._limiter", "cbtasks._classify", "cbtasks._events"),
    ("cbtasks.stores",),
    ("cbtasks._health", "cbtasks._breaker"),
    ("cbtasks.fallbacks", "cbtasks.clients", "cbtasks.server", "cbtasks.task"),
    ("cbtasks.ops", "cbtasks.gateway", "cbtasks.testing", "cbtasks._testing"),
)


def _layer(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer):
            return i
    return None


def test_dependencies_point_one_way() -> None:
    """Pure core <- stores <- breaker <- task <- ops: no module imports one of a layer
    above its own (instrumentation is found by name, not imported: _events)."""
    modules = _modules()
    upward = []
    for name, path in modules.items():
        mine = _layer(name)
        if mine is None:
            continue
        for target in _imports(name, path, modules):
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{name} -> {target}")
    assert not upward, upward


def test_importing_cbtasks_wires_nothing() -> None:
    """Importing every module changes no Celery global and connects no signal; a task
    bound to an app wires that app (once)."""
    import subprocess
    import sys

    code = """
import importlib, pkgutil, re
from celery import Celery, signals
from celery.app import utils
def seen():
    return (utils.HIDDEN_SETTINGS.pattern,
            [len(s.receivers) for s in (signals.worker_init, signals.worker_ready,
             signals.worker_shutting_down, signals.task_received)])
before = seen()
import cbtasks
for info in pkgutil.walk_packages(cbtasks.__path__, "cbtasks."):
    name = info.name
    if not name.endswith("__main__") and not name.startswith("cbtasks.server.grpc"):
        importlib.import_module(name)
assert seen() == before, (before, seen())
app = Celery("wired", set_as_current=False, broker="memory://")
@app.task(base=cbtasks.CircuitBreakerTask, shared=False)
def predict(): pass
app.finalize(auto=True)
after = seen()
assert "CBTASKS_REDIS_URL" in after[0] and after[1][0] == before[1][0] + 1, after
other = Celery("other", set_as_current=False, broker="memory://")
@other.task(base=cbtasks.CircuitBreakerTask, shared=False)
def again(): pass
other.finalize(auto=True)
assert seen()[1][0] == before[1][0] + 2 and seen()[1][2] == before[1][2] + 1, seen()
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
