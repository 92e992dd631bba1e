"""RedisStore: one breaker state shared by every process on every host.

Each operation is one Lua script run with EVALSHA: one round trip, atomic,
timed by Redis's own clock (``TIME``), so hosts whose clocks disagree still
agree on when a circuit reopens. Keys are hash-tagged per breaker
(``cbtasks:{name}:s``) so every key of one breaker lives on one Redis Cluster
slot. A state change is published on ``<prefix>:news``; each process listens
in a background thread and updates its local views within milliseconds.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from .._errors import PolicyError, StoreError, StoreUnavailableError
from .._machine import CLOSED, HALF_OPEN, OPEN, Transition
from .._policy import PolicyWire
from .._state import STATE_BY_CODE, Mode, Outcome
from ._base import BreakerStatus, LocalView, Reply, validate_name
from ._memory import MemoryStore

__all__ = ["OnError", "RedisStore"]

log = logging.getLogger("cbtasks.redis")

# Errors that mean "Redis cannot be reached now", as opposed to a bug.
_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


class OnError(enum.StrEnum):
    """What breakers do while Redis cannot be reached."""

    #: Each process keeps its own in-memory breaker until Redis returns.
    LOCAL = "local"
    #: Admit every call (fail open).
    ADMIT = "admit"
    #: Reject every call with CircuitOpenError (fail closed).
    REJECT = "reject"


def _load_scripts() -> dict[str, str]:
    lua = resources.files("cbtasks.stores") / "lua"
    clock = (lua / "clock.lua").read_text()
    machine = clock + (lua / "common.lua").read_text()
    scripts = {
        op: machine + "\n" + (lua / f"{op}.lua").read_text()
        for op in ("admit", "record", "control", "status")
    }
    # The healthy path's script does without the machine: only the clock.
    scripts["success"] = clock + (lua / "success.lua").read_text()
    return scripts


_SCRIPTS = _load_scripts()


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
        if not 0 < timeout <= 60:
            raise PolicyError(
                f"timeout must be a number of seconds above 0 and at most 60, got {timeout!r}"
            )
        if not 0 < retry_interval <= 3600:
            raise PolicyError(
                f"retry_interval must be a number of seconds above 0 and at most 3600, "
                f"got {retry_interval!r}"
            )
        self.client = _client(url_or_client, timeout)
        self.prefix = prefix
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.channel = f"{prefix}:news"
        # A fake clock (tests) is sent to the scripts; else they read Redis TIME.
        self._fake_clock = clock
        self.local_clock: Callable[[], float] = clock or time.monotonic
        self._shas: dict[str, str] = {}
        self._fixed: dict[str, tuple[bytes, ...]] = {}
        self._views: dict[str, LocalView] = {}
        self._views_lock = threading.Lock()
        self._local = MemoryStore()
        self._outage_started: float | None = None
        self._retry_at = 0.0
        self._listener: _NewsListener | None = None
        self._pid = os.getpid()
        #: Redis calls that failed, and calls decided by ``on_error`` meanwhile.
        self.error_count = 0
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
        self._ensure_listener()
        with self._views_lock:
            view = self._views.get(name)
            if view is None:
                view = self._views[name] = LocalView()
            return view

    def admit(self, name: str, policy: PolicyWire, probe_id: str) -> Reply:
        raw = self._run("admit", name, policy, probe_id)
        if raw is None:
            return self._fallback_admit(name, policy, probe_id)
        admitted, is_probe, retry_after_ms = raw[0], raw[1], raw[2]
        return self._reply(
            name, raw, 3, bool(admitted), probe_id if is_probe else None, retry_after_ms
        )

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
        return self._reply(name, raw, 0)

    def control(self, name: str, policy: PolicyWire, op: str) -> Reply:
        raw = self._run("control", name, policy, op, strict=True)
        assert raw is not None
        return self._reply(name, raw, 0)

    def status(self, name: str, policy: PolicyWire) -> BreakerStatus | None:
        raw = self._run("status", name, policy, strict=True)
        assert raw is not None
        exists, state, _remaining, mode, _version, _now = raw[:6]
        trips, consecutive, calls, failures, slow, probes, open_until = raw[-7:]
        if not exists:
            return None
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
        except _OUTAGE_ERRORS as exc:
            raise StoreUnavailableError(self._unreachable(exc)) from exc
        return sorted(found)

    # -- operations ------------------------------------------------------------

    def ping(self) -> None:
        """Raise StoreUnavailableError, saying what to check, if Redis is unreachable."""
        try:
            self.client.ping()
        except _OUTAGE_ERRORS as exc:
            raise StoreUnavailableError(self._unreachable(exc)) from exc
        except redis.RedisError as exc:
            raise StoreError(
                f"Redis at {describe_client(self.client)} refused PING: {exc}"
            ) from exc

    @property
    def available(self) -> bool:
        """False while Redis is thought unreachable (an outage is in progress)."""
        return self._outage_started is None

    def close(self) -> None:
        """Stop the news listener and close the connections."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
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
        if self._outage_started is not None and not strict and time.monotonic() < self._retry_at:
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
        except _OUTAGE_ERRORS as exc:
            self._outage(exc)
            if strict:
                raise StoreUnavailableError(self._unreachable(exc)) from exc
            self.fallback_decisions += 1
            return None
        except redis.RedisError as exc:
            raise StoreError(f"breaker {name!r}: Redis {op} script failed: {exc}") from exc
        if self._outage_started is not None:
            self._recovered()
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
            sha = self._shas[op] = self.client.script_load(_SCRIPTS[op])
        return sha

    def _reply(
        self,
        name: str,
        raw: list[Any],
        at: int,
        admitted: bool = True,
        probe_id: str | None = None,
        retry_after_ms: int = 0,
    ) -> Reply:
        state, remaining, mode, version, now = raw[at : at + 5]
        rest = raw[at + 5 :]
        transitions: tuple[Transition, ...] = tuple(
            (rest[i], rest[i + 1], rest[i + 2].decode()) for i in range(0, len(rest) - 2, 3)
        )
        return Reply(
            admitted, probe_id, retry_after_ms, state, remaining, mode, version, now, transitions
        )

    def _fallback_admit(self, name: str, policy: PolicyWire, probe_id: str) -> Reply:
        if self.on_error is OnError.LOCAL:
            return _uncacheable(self._local.admit(name, policy, probe_id))
        admitted = self.on_error is OnError.ADMIT
        retry_ms = 0 if admitted else int(self.retry_interval * 1000)
        return _uncacheable(Reply(admitted, None, retry_ms, 0, 0, 0, 0, 0, ()))

    def _outage(self, exc: BaseException) -> None:
        self.error_count += 1
        self._retry_at = time.monotonic() + self.retry_interval
        if self.on_store_error is not None:
            self.on_store_error(exc)
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            # Cached "closed" views would skip on_error: every call must ask now.
            self._forget_views()
            log.warning(
                "%s; breakers now %s until it returns (on_error=%r)",
                self._unreachable(exc),
                _ON_ERROR_MEANING[self.on_error],
                self.on_error.value,
            )

    def _recovered(self) -> None:
        assert self._outage_started is not None
        seconds = time.monotonic() - self._outage_started
        self._outage_started = None
        self._local = MemoryStore()  # the shared state is the truth again
        self._forget_views()
        log.warning(
            "Redis at %s is reachable again after %.1fs; breakers use the shared state",
            describe_client(self.client),
            seconds,
        )

    def _unreachable(self, exc: BaseException) -> str:
        return (
            f"cannot reach Redis at {describe_client(self.client)} "
            f"({type(exc).__name__}: {exc}); check that it runs and that the URL is right"
        )

    def _forget_views(self) -> None:
        with self._views_lock:
            for view in self._views.values():
                view.forget()

    def _on_news(self, name: str, version: int, state: int, remaining: int, mode: int) -> None:
        view = self._views.get(name)
        if view is not None:
            view.apply(state, remaining, mode, version, self.local_clock())

    def _ensure_listener(self) -> None:
        if self._pid != os.getpid():
            # A forked child (Celery prefork): the parent's thread did not come along.
            self._pid = os.getpid()
            self._listener = None
            self._forget_views()
        if self._listener is None:
            self._listener = _NewsListener(self)
            self._listener.start()


_ON_ERROR_MEANING = {
    OnError.LOCAL: "keep a local breaker in each process",
    OnError.ADMIT: "admit every call",
    OnError.REJECT: "reject every call",
}


def _uncacheable(reply: Reply) -> Reply:
    return reply._replace(cacheable=False)


class _NewsListener:
    """A daemon thread that applies published state changes to local views."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"cbtasks-news-{store.prefix}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)  # it wakes at least every 0.5 s

    def _run(self) -> None:
        store = self._store
        while not self._stopped.is_set():
            pubsub = store.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(store.channel)
                # News sent while we were not listening is lost: ask afresh.
                store._forget_views()
                while not self._stopped.is_set():
                    try:
                        message = pubsub.get_message(timeout=0.5)
                    except redis.TimeoutError:
                        continue
                    if message is not None and message["type"] == "message":
                        _apply_news(store, message["data"])
            except _OUTAGE_ERRORS as exc:
                # Often the first sign of an outage: calls stop trusting cached views.
                if not self._stopped.is_set():
                    store._outage(exc)
                self._stopped.wait(store.retry_interval)
            except Exception:
                log.exception("breaker news listener failed; reconnecting")
                self._stopped.wait(store.retry_interval)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    log.debug("closing the news subscription failed", exc_info=True)


def _apply_news(store: RedisStore, data: bytes) -> None:
    try:
        name, version, state, remaining, mode = data.decode().split("\n")
        store._on_news(name, int(version), int(state), int(remaining), int(mode))
    except ValueError:
        log.warning("ignoring malformed breaker news on %s: %r", store.channel, data[:200])


def _client(url_or_client: str | redis.Redis, timeout: float) -> redis.Redis:
    if isinstance(url_or_client, redis.Redis):
        return url_or_client
    if not isinstance(url_or_client, str):
        raise PolicyError(
            "RedisStore needs a Redis URL or a redis.Redis client, "
            f"got {type(url_or_client).__name__}"
        )
    try:
        return redis.Redis.from_url(
            url_or_client,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One try per call: on_error decides, rather than 10 retries stalling it.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
        )
    except (ValueError, TypeError) as exc:
        raise PolicyError(
            f"malformed Redis URL {redact_url(url_or_client)!r}: {exc}. "
            "Use redis://[:password@]host:port/db, rediss://... for TLS, or unix:///path"
        ) from None


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0] if ":" in credentials else ""
    return f"{scheme}://{user}:***@{host}" if user else f"{scheme}://***@{host}"


def describe_client(client: redis.Redis) -> str:
    """Where a client connects, never with its password."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = (
        "rediss" if client.connection_pool.connection_class.__name__ == "SSLConnection" else "redis"
    )
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"{scheme}://{host}:{port}/{kwargs.get('db', 0)}"
