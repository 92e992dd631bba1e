"""The package as users install it: a built wheel and sdist, each in a fresh virtual environment."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run by the installed package, from a folder outside the source tree: a
# guarded call against a real Redis that trips the shared circuit (the Lua
# scripts must have been installed), and the reference server importable.
CHECK = """
import sys
import cbtasks
from cbtasks import CircuitBreaker, CircuitOpenError, RedisStore, State

assert "site-packages" in cbtasks.__file__, cbtasks.__file__
store = RedisStore(sys.argv[1])
breaker = CircuitBreaker("packaging-check", fail_max=2, reset_timeout=60, store=store)
assert breaker.call(lambda: 42) == 42
for _ in range(2):
    try:
        breaker.call(lambda: 1 / 0)
    except ZeroDivisionError:
        pass
try:
    breaker.call(lambda: 42)
    raise SystemExit("the circuit did not open")
except CircuitOpenError:
    pass
assert breaker.state is State.OPEN
breaker.reset()
store.close()
print("guarded call ok")
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of what a clone has: a build/ folder left in the
    # working tree by an earlier build would hide files the config misses.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "cbtasks", source / "cbtasks", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("dist")
    for kind in ("--wheel", "--sdist"):
        subprocess.run(
            [sys.executable, "-m", "build", kind, "--outdir", str(out), str(source)],
            check=True,
            capture_output=True,
        )
    return out


@pytest.mark.parametrize("pattern", ["cbtasks-*.whl", "cbtasks-*.tar.gz"])
def test_built_package_works_from_a_fresh_virtualenv(
    dist: Path, pattern: str, tmp_path: Path, redis_url: str
) -> None:
    """Installed from the wheel or the sdist: Lua scripts found, a guarded call trips, CLI runs."""
    (artifact,) = dist.glob(pattern)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(artifact)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    check = subprocess.run(
        [str(python), "-c", CHECK, redis_url], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    assert "guarded call ok" in check.stdout
    cli = subprocess.run(
        [str(env_dir / "bin" / "cbtasks"), "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr
    assert "status" in cli.stdout
