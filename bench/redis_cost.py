"""Redis commands that clients send per guarded call: cbtasks against pybreaker.

    python -m bench.redis_cost [--calls N]

Counts what MONITOR shows, less the lines that scripts run inside (an EVALSHA
counts as one, whatever its script does; INFO commandstats would also count
the commands run inside scripts).
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pybreaker
import redis

from bench._timing import table
from cbtasks import CircuitBreaker, CircuitOpenError, RedisStore
from cbtasks._testing.redis_server import RedisServer
from tests.conftest import wait_for

_STOP = "cbtasks-bench-stop"


class CommandCounter:
    """Counts the commands clients send to one Redis, through MONITOR."""

    def __init__(self, url: str) -> None:
        self.url = url
        # Connected now, so its handshake is not counted against anyone.
        self._control = redis.Redis.from_url(url)
        self._control.ping()

    @contextlib.contextmanager
    def counting(self) -> Iterator[list[str]]:
        commands: list[str] = []
        ready = threading.Event()
        client = redis.Redis.from_url(self.url)

        def listen() -> None:
            with client.monitor() as monitor, contextlib.suppress(redis.RedisError, TypeError):
                ready.set()
                for line in monitor.listen():
                    command = str(line["command"])
                    if _STOP in command:
                        return
                    if line.get("client_type") != "lua" and line.get("client_address") != "lua":
                        commands.append(command.split(" ", 1)[0].upper())

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        ready.wait(5)
        self._control.ping()  # let MONITOR settle
        wait_for(lambda: bool(commands), 5, "MONITOR to start")
        commands.clear()
        yield commands
        self._control.echo(_STOP)
        thread.join(5)


def count(counter: CommandCounter, action: Callable[[], object]) -> list[str]:
    with counter.counting() as commands:
        action()
    return list(commands)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="guarded calls per scenario")
    parser.add_argument("--verbose", action="store_true", help="print the commands counted")
    args = parser.parse_args(argv)
    verbose = args.verbose
    n = args.calls

    def boom() -> None:
        raise ConnectionError("endpoint down")

    def fail(call: Callable[[Callable[[], None]], object]) -> None:
        with contextlib.suppress(ConnectionError, pybreaker.CircuitBreakerError):
            call(boom)

    with RedisServer() as server:
        counter = CommandCounter(server.url)
        store = RedisStore(server.url)
        ours = CircuitBreaker("cost", fail_max=5, reset_timeout=0.2, store=store)
        ours.call(lambda: None)  # first use: learns the state
        for op in ("admit", "record", "success", "control", "status"):
            store._sha(op)  # scripts are loaded once per process, not per call
        pb = pybreaker.CircuitBreaker(
            fail_max=5,
            reset_timeout=0.2,
            state_storage=pybreaker.CircuitRedisStorage(
                pybreaker.STATE_CLOSED, redis.Redis.from_url(server.url), namespace="pb"
            ),
        )
        pb.call(lambda: None)

        rows = [("scenario", "cbtasks", "pybreaker")]
        figures: dict[str, float] = {}

        def scenario(
            label: str, mine: Callable[[], object], theirs: Callable[[], object], per: int
        ) -> None:
            a, b = count(counter, mine), count(counter, theirs)
            if verbose:
                print(label, "cbtasks:", a[:12], "pybreaker:", b[:12])
            figures[label] = len(a) / per
            rows.append((label, f"{len(a) / per:g}", f"{len(b) / per:g}"))

        scenario(
            "healthy call (per call)",
            lambda: [ours.call(lambda: None) for _ in range(n)],
            lambda: [pb.call(lambda: None) for _ in range(n)],
            n,
        )
        scenario(
            "trip: 5 failures (total)",
            lambda: [fail(ours.call) for _ in range(5)],
            lambda: [fail(pb.call) for _ in range(5)],
            1,
        )

        def rejected(call: Callable[..., object]) -> None:
            for _ in range(n):
                with contextlib.suppress(CircuitOpenError, pybreaker.CircuitBreakerError):
                    call(lambda: None)

        scenario(
            "rejected while open (per call)",
            lambda: rejected(ours.call),
            lambda: rejected(pb.call),
            n,
        )
        wait_for(lambda: ours.status().state.value == "half_open", 5)  # type: ignore[union-attr]
        time.sleep(0.25)  # pybreaker's own timer, on the local clock
        scenario(
            "half-open probe that closes (total)",
            lambda: ours.call(lambda: None),
            lambda: pb.call(lambda: None),
            1,
        )
        store.close()
    print(table(rows))
    return figures


if __name__ == "__main__":
    main()
