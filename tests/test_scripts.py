"""The stores' Lua scripts are found by their mark: a new operation is its file."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pytest
import redis

from cbtasks.stores._redis import drive
from cbtasks.stores._scripts import SCRIPTS, scripts_in

LUA = resources.files("cbtasks.stores") / "lua"


def test_every_marked_file_is_a_script_and_every_part_is_loaded_before_it() -> None:
    """The shipped scripts, each with the parts it names, and no part run on its own."""
    assert set(SCRIPTS) == {
        "admit", "record", "status", "control", "success", "park", "release", "ack", "lease",
    }  # fmt: skip
    constants = (LUA / "constants.lua").read_text()
    limit = (LUA / "limit.lua").read_text()
    assert SCRIPTS["admit"].text.startswith(constants)
    assert limit in SCRIPTS["admit"].text and limit not in SCRIPTS["control"].text
    assert SCRIPTS["lease"].text == (LUA / "lease.lua").read_text()


def test_a_new_operation_is_one_file_and_runs(tmp_path: Path, redis_url: str) -> None:
    """A file marked as a script after the clock: found, its parts before it, run by SHA
    (loaded on NOSCRIPT), nothing else named anywhere."""
    for part in ("constants", "clock"):
        shutil.copy(str(LUA / f"{part}.lua"), tmp_path / f"{part}.lua")
    (tmp_path / "twice_now.lua").write_text(
        "--! script after: constants clock\n"
        "-- The time in ms, twice over: a new operation's whole text.\n"
        "return {now_ms(ARGV[1]), now_ms(ARGV[1]) * 2, OPEN}\n"
    )
    (tmp_path / "README.txt").write_text("not a script: passed over\n")
    scripts = scripts_in(tmp_path)
    assert set(scripts) == {"twice_now"}
    client = redis.Redis.from_url(redis_url)
    try:
        assert drive(client, scripts["twice_now"].run(0, "21")) == [21, 42, 1]
    finally:
        client.close()


def test_a_mark_written_wrong_says_how_to_write_it(tmp_path: Path) -> None:
    (tmp_path / "op.lua").write_text("--! script before: clock\nreturn 1\n")
    with pytest.raises(ValueError, match="after: <part>"):
        scripts_in(tmp_path)
    (tmp_path / "op.lua").write_text("--! script after: nowhere elsewhere\nreturn 1\n")
    with pytest.raises(ValueError, match="no part named nowhere, elsewhere in lua/"):
        scripts_in(tmp_path)
