"""RedisStore: one breaker state shared by every process on every host.

Each operation is one Lua script run with EVALSHA: one round trip, atomic,
timed by Redis's own clock (``TIME``), so hosts whose clocks disagree still
agree on when a circuit reopens. Keys are hash-tagged per breaker
(``cbtasks:{name}:s``) so every key of one breaker lives on one Redis Cluster
slot. A state change is published on ``<prefix>:news``; each process listens
in a background thread and updates its local views within milliseconds.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import NoScriptError

from .._errors import PolicyError, StoreError, StoreUnavailableError
from .._machine import CLOSED, HALF_OPEN, OPEN
from .._policy import PolicyWire
from .._state import STATE_BY_CODE, Mode, Outcome
from ._base import BreakerStatus, LocalView, Reply, validate_name
from ._connection import (
    REDIS_DOWN,
    describe_client,
    is_number,
    make_client,
    unreachable_message,
)
from ._memory import MemoryStore
from ._news import ProcessNews
from ._outage import OnError, Outage
from ._scripts import MACHINE_SCRIPTS, parse_reply

__all__ = ["RedisStore"]

log = logging.getLogger("cbtasks.redis")


_MODES = frozenset(int(mode) for mode in Mode)


class RedisStore:
    """Keeps breaker state in Redis, shared by every process that uses it.

    ``url_or_client`` is a ``redis://``, ``rediss://`` (TLS) or ``unix://``
    URL, credentials and TLS options included, or a ready ``redis.Redis``.
    ``timeout`` bounds every Redis call (seconds), so an outage never stalls
    a guarded call for long; ``on_error`` (an :class:`OnError` or its value)
    says what breakers do meanwhile. Redis is tried again every
    ``retry_interval`` seconds; until then calls skip it.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis = "redis://localhost:6379/0",
        *,
        prefix: str = "cbtasks",
        on_error: OnError | str = OnError.LOCAL,
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        try:
            self.on_error = OnError(on_error)
        except ValueError:
            choices = ", ".join(repr(e.value) for e in OnError)
            raise PolicyError(f"on_error must be one of {choices}, got {on_error!r}") from None
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise PolicyError(f"prefix must be a non-empty string without braces, got {prefix!r}")
        if not is_number(timeout) or not 0 < timeout <= 60:
            raise PolicyError(
                f"timeout must be a number of seconds above 0 and at most 60, got {timeout!r}"
            )
        if not is_number(retry_interval) or not 0 < retry_interval <= 3600:
            raise PolicyError(
                f"retry_interval must be a number of seconds above 0 and at most 3600, "
                f"got {retry_interval!r}"
            )
        self.client = make_client(url_or_client, timeout)
        self.prefix = prefix
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.channel = f"{prefix}:news"
        # A fake clock (tests) is sent to the scripts; else they read Redis TIME.
        self._fake_clock = clock
        self.local_clock: Callable[[], float] = clock or time.monotonic
        self._shas: dict[str, str] = {}
        self._fixed: dict[str, tuple[bytes, ...]] = {}
        self._local = MemoryStore()
        self.outage = Outage(self.on_error, retry_interval)
        #: This process's views of the breakers; news makes them ask again.
        self.news = ProcessNews(self.client, prefix, self._outage, retry_interval)
        #: Calls decided by ``on_error`` while Redis was unreachable.
        self.fallback_decisions = 0
        #: Called with the exception each time a Redis call fails (metrics hook).
        self.on_store_error: Callable[[BaseException], None] | None = None

    def __repr__(self) -> str:
        return (
            f"RedisStore({describe_client(self.client)!r}, prefix={self.prefix!r}, "
            f"on_error={self.on_error.value!r})"
        )

    # -- the Store interface -------------------------------------------------

    def view(self, name: str) -> LocalView:
        return self.news.view(name)

    def admit(self, name: str, policy: PolicyWire, probe_id: str) -> Reply:
        raw = self._run("admit", name, policy, probe_id)
        if raw is None:
            return self._fallback_admit(name, policy, probe_id)
        admitted, is_probe, retry_after_ms = raw[0], raw[1], raw[2]
        return parse_reply(raw, 3, bool(admitted), probe_id if is_probe else None, retry_after_ms)

    def record(
        self,
        name: str,
        policy: PolicyWire,
        probe_id: str | None,
        outcome: Outcome,
        slow: bool,
        retry_after_ms: int,
    ) -> Reply:
        if probe_id is None and outcome is Outcome.SUCCESS and not slow and not policy.window_kind:
            # The healthy path: a small script that skips loading the machine.
            key = self._fixed_arguments(name)[0]
            raw = self._evalsha("success", name, (1, key, policy.open_ms, self._now_arg()))
            if type(raw) is int:  # closed: version * 4 + mode
                return Reply(True, None, 0, CLOSED, 0, raw & 3, raw >> 2, 0, ())
            if raw is not None:
                return Reply(True, None, 0, raw[0], raw[1], raw[2], raw[3], raw[4], ())
        else:
            raw = self._run(
                "record",
                name,
                policy,
                probe_id or "",
                int(outcome),
                1 if slow else 0,
                retry_after_ms,
                repr(random.random()) if policy.jitter else "0",
            )
        if raw is None:
            if self.on_error is OnError.LOCAL:
                reply = self._local.record(name, policy, probe_id, outcome, slow, retry_after_ms)
                return _uncacheable(reply)
            return _uncacheable(Reply(True, None, 0, 0, 0, 0, 0, 0, ()))
        return parse_reply(raw, 0)

    def control(self, name: str, policy: PolicyWire, op: str) -> Reply:
        raw = self._run("control", name, policy, op, strict=True)
        assert raw is not None
        return parse_reply(raw, 0)

    def status(self, name: str, policy: PolicyWire) -> BreakerStatus | None:
        raw = self._run("status", name, policy, strict=True)
        assert raw is not None
        exists, state, _remaining, mode, _version, _now = raw[:6]
        trips, consecutive, calls, failures, slow, probes, open_until = raw[-7:]
        if not exists:
            return None
        if not 0 <= state < len(STATE_BY_CODE) or mode not in _MODES:
            raise StoreError(
                f"breaker {name!r} has corrupt state in Redis (st={state!r}, md={mode!r}); "
                f"`cbtasks reset {name}` writes it afresh"
            )
        return BreakerStatus(
            name=name,
            state=STATE_BY_CODE[state],
            mode=Mode(mode),
            open_until=open_until / 1000 if state == OPEN else None,
            trips=trips,
            consecutive_failures=consecutive,
            window_calls=calls,
            window_failures=failures,
            window_slow=slow,
            probes_in_use=probes if state == HALF_OPEN else 0,
        )

    def names(self) -> list[str]:
        """Every breaker with state under this store's prefix (SCAN, not KEYS)."""
        start = len(self.prefix) + 2
        try:
            found = {
                key.decode()[start:-3]
                for key in self.client.scan_iter(match=f"{self.prefix}:{{*}}:s", count=500)
            }
        except REDIS_DOWN as exc:
            raise StoreUnavailableError(unreachable_message(self.client, exc)) from exc
        return sorted(found)

    def claim(self, name: str, what: str, ttl_ms: int) -> bool:
        key = f"{self.prefix}:{{{validate_name(name)}}}:claim:{what}"
        try:
            return bool(self.client.set(key, os.getpid(), nx=True, px=max(1, ttl_ms)))
        except REDIS_DOWN as exc:
            self._outage(exc)
            return False

    # -- operations ------------------------------------------------------------

    def ping(self) -> None:
        """Raise StoreUnavailableError, saying what to check, if Redis is unreachable."""
        try:
            self.client.ping()
        except REDIS_DOWN as exc:
            raise StoreUnavailableError(unreachable_message(self.client, exc)) from exc
        except redis.RedisError as exc:
            raise StoreError(
                f"Redis at {describe_client(self.client)} refused PING: {exc}"
            ) from exc

    @property
    def available(self) -> bool:
        """False while Redis is thought unreachable (an outage is in progress)."""
        return self.outage.started is None

    def close(self) -> None:
        """Stop the news listener and close the connections."""
        self.news.stop()
        self.client.close()

    # -- internals -------------------------------------------------------------

    def _run(self, op: str, name: str, policy: PolicyWire, *args: Any, strict: bool = False) -> Any:
        """Run one of the machine's scripts; None while Redis is unreachable."""
        fixed = self._fixed_arguments(name)
        return self._evalsha(
            op, name, (3, *fixed, policy.encoded, self._now_arg(), *args), strict=strict
        )

    def _evalsha(self, op: str, name: str, argv: tuple[Any, ...], strict: bool = False) -> Any:
        """One script call; None while Redis is unreachable (unless ``strict``)."""
        if not strict and self.outage.skip_redis():
            self.fallback_decisions += 1
            return None
        try:
            try:
                reply = self.client.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", self._sha(op), *argv
                )
            except NoScriptError:
                self._shas.pop(op, None)
                reply = self.client.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", self._sha(op), *argv
                )
        except REDIS_DOWN as exc:
            self._outage(exc)
            if strict:
                raise StoreUnavailableError(unreachable_message(self.client, exc)) from exc
            self.fallback_decisions += 1
            return None
        except redis.RedisError as exc:
            # Redis answered, but with an error (a key of the wrong type, OOM,
            # an ACL without EVALSHA): the shared state cannot be used either,
            # so on_error decides, as in an outage, and says why.
            if strict:
                raise StoreError(f"breaker {name!r}: Redis {op} script failed: {exc}") from exc
            self._outage(exc)
            self.fallback_decisions += 1
            return None
        if self.outage.started is not None:
            self.outage.ended(describe_client(self.client))
            self._local = MemoryStore()  # the shared state is the truth again
            self.news.forget_views()
        return reply

    def _fixed_arguments(self, name: str) -> tuple[bytes, ...]:
        """A breaker's keys, the news channel and its name, encoded once."""
        fixed = self._fixed.get(name)
        if fixed is None:
            validate_name(name)
            base = f"{self.prefix}:{{{name}}}"
            fixed = self._fixed[name] = tuple(
                s.encode() for s in (f"{base}:s", f"{base}:r", f"{base}:p", self.channel, name)
            )
        return fixed

    def _now_arg(self) -> str:
        """The time the scripts use: '' for Redis TIME, else the fake clock's, in ms."""
        return "" if self._fake_clock is None else str(int(self._fake_clock() * 1000))

    def _sha(self, op: str) -> str:
        sha = self._shas.get(op)
        if sha is None:
            sha = self._shas[op] = self.client.script_load(MACHINE_SCRIPTS[op])
        return sha

    def _fallback_admit(self, name: str, policy: PolicyWire, probe_id: str) -> Reply:
        if self.on_error is OnError.LOCAL:
            return _uncacheable(self._local.admit(name, policy, probe_id))
        admitted = self.on_error is OnError.ADMIT
        retry_ms = 0 if admitted else int(self.retry_interval * 1000)
        return _uncacheable(Reply(admitted, None, retry_ms, 0, 0, 0, 0, 0, ()))

    def _outage(self, exc: BaseException) -> None:
        if self.on_store_error is not None:
            self.on_store_error(exc)
        # Cached "closed" views would skip on_error: every call must ask now.
        self.outage.failed(unreachable_message(self.client, exc), self.news.forget_views)

    @property
    def error_count(self) -> int:
        """Redis calls that failed."""
        return self.outage.error_count

    def add_news_hook(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(name)`` on news of breaker ``name``: a state change or a first park."""
        self.news.add_hook(hook)


def _uncacheable(reply: Reply) -> Reply:
    return reply._replace(cacheable=False)
