"""What RedisStore and AsyncRedisStore share: options, keys, script arguments, replies, outages.

The two stores differ only in how they talk to Redis (a blocking client or
``redis.asyncio``); everything around the round trip lives here, once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from .._errors import PolicyError, StoreError, StoreUnavailableError
from .._machine import CLOSED, HALF_OPEN, OPEN
from .._policy import PolicyWire
from .._state import STATE_BY_CODE, Mode, Outcome
from ._base import BreakerStatus, LocalView, Reply, validate_name
from ._connection import REDIS_DOWN, describe_client, is_number, unreachable_message
from ._memory import MemoryStore
from ._news import ProcessNews
from ._outage import OnError, Outage
from ._scripts import parse_reply

_MODES = frozenset(int(mode) for mode in Mode)

#: A script call: the script's name and its EVALSHA arguments after the sha.
ScriptCall = tuple[str, tuple[Any, ...]]


class RedisStoreBase:
    """Options, keys and replies of a store whose state lives in Redis.

    A subclass sets ``client`` (what it sends commands through) and ``news``
    (a :class:`ProcessNews` on a blocking client) and does the round trips.
    """

    client: Any
    news: ProcessNews

    def __init__(
        self,
        *,
        prefix: str,
        on_error: OnError | str,
        timeout: float,
        retry_interval: float,
        clock: Callable[[], float] | None,
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
        self._outages: dict[str, Outage] = {}
        #: Calls decided by ``on_error`` while Redis was unreachable.
        self.fallback_decisions = 0
        #: Called with the exception each time a Redis call fails (metrics hook).
        self.on_store_error: Callable[[BaseException], None] | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({describe_client(self.client)!r}, prefix={self.prefix!r}, "
            f"on_error={self.on_error.value!r})"
        )

    def view(self, name: str) -> LocalView:
        return self.news.view(name)

    def add_news_hook(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(name)`` on news of breaker ``name``: a state change or a first park."""
        self.news.add_hook(hook)

    @property
    def available(self) -> bool:
        """False while Redis (or, on a cluster, any breaker's node) is thought unreachable."""
        outages = [self.outage, *self._outages.values()]
        return all(outage.started is None for outage in outages)

    @property
    def error_count(self) -> int:
        """Redis calls that failed."""
        return self.outage.error_count + sum(o.error_count for o in self._outages.values())

    @property
    def _per_breaker(self) -> bool:
        return isinstance(self.client, RedisCluster | AsyncRedisCluster)

    # -- the scripts' arguments ---------------------------------------------------

    def _machine_call(self, op: str, name: str, policy: PolicyWire, *args: Any) -> ScriptCall:
        """One of the machine's scripts: keys, channel and name, policy, time, then ``args``."""
        return op, (3, *self._fixed_arguments(name), policy.encoded, self._now_arg(), *args)

    def _record_call(
        self,
        name: str,
        policy: PolicyWire,
        probe_id: str | None,
        outcome: Outcome,
        slow: bool,
        retry_after_ms: int,
    ) -> ScriptCall:
        if probe_id is None and outcome is Outcome.SUCCESS and not slow and not policy.window_kind:
            # The healthy path: a small script that skips loading the machine.
            key = self._fixed_arguments(name)[0]
            return "success", (1, key, policy.open_ms, self._now_arg())
        jitter = repr(random.random()) if policy.jitter else "0"
        args = (probe_id or "", int(outcome), 1 if slow else 0, retry_after_ms, jitter)
        return self._machine_call("record", name, policy, *args)

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

    def _claim_key(self, name: str, what: str) -> str:
        return f"{self.prefix}:{{{validate_name(name)}}}:claim:{what}"

    def _names_from(self, keys: list[bytes]) -> list[str]:
        start = len(self.prefix) + 2
        return sorted({key.decode()[start:-3] for key in keys})

    @property
    def _names_pattern(self) -> str:
        return f"{self.prefix}:{{*}}:s"

    # -- replies ------------------------------------------------------------------

    def _admit_reply(self, raw: Any, name: str, policy: PolicyWire, probe_id: str) -> Reply:
        if raw is None:
            if self.on_error is OnError.LOCAL:
                return _uncacheable(self._local.admit(name, policy, probe_id))
            admitted = self.on_error is OnError.ADMIT
            retry_ms = 0 if admitted else int(self.retry_interval * 1000)
            return _uncacheable(Reply(admitted, None, retry_ms, 0, 0, 0, 0, 0, ()))
        admitted, is_probe, retry_after_ms = raw[0], raw[1], raw[2]
        return parse_reply(raw, 3, bool(admitted), probe_id if is_probe else None, retry_after_ms)

    def _record_reply(
        self,
        raw: Any,
        op: str,
        name: str,
        policy: PolicyWire,
        probe_id: str | None,
        outcome: Outcome,
        slow: bool,
        retry_after_ms: int,
    ) -> Reply:
        if raw is None:
            if self.on_error is OnError.LOCAL:
                reply = self._local.record(name, policy, probe_id, outcome, slow, retry_after_ms)
                return _uncacheable(reply)
            return _uncacheable(Reply(True, None, 0, 0, 0, 0, 0, 0, ()))
        if op != "success":
            return parse_reply(raw, 0)
        if type(raw) is int:  # closed: version * 4 + mode
            return Reply(True, None, 0, CLOSED, 0, raw & 3, raw >> 2, 0, ())
        return Reply(True, None, 0, raw[0], raw[1], raw[2], raw[3], raw[4], ())

    def _status_from(self, name: str, raw: Any) -> BreakerStatus | None:
        if raw is None:  # unreachable, and the caller asked not to raise
            return None
        exists, state, remaining, mode, version, _now = raw[:6]
        trips, consecutive, calls, failures, slow, probes, open_until = raw[-7:]
        if not 0 <= state < len(STATE_BY_CODE) or mode not in _MODES:
            raise StoreError(
                f"breaker {name!r} has corrupt state in Redis (st={state!r}, md={mode!r}); "
                f"`cbtasks reset {name}` writes it afresh"
            )
        # A read of the shared state is as good as any reply: a breaker of this
        # process learns it (no state yet reads as closed, version 0: news of a
        # trip is newer). An operator's read (CLI, metrics) makes no view, and
        # so starts no news subscription.
        view = self.news.existing_view(name)
        if view is not None:
            view.apply(state, remaining, mode, version, self.local_clock())
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
            retry_after=remaining / 1000 if state == OPEN else 0.0,
        )

    # -- outages --------------------------------------------------------------------
    #
    # One Redis is up or down for every breaker. On a cluster each breaker's keys
    # live on one node: a node lost is an outage of its breakers only.

    def _outage_of(self, name: str | None) -> Outage:
        if name is None or not self._per_breaker:
            return self.outage
        outage = self._outages.get(name)
        if outage is None:
            outage = self._outages[name] = Outage(self.on_error, self.retry_interval)
        return outage

    def _skip_redis(self, name: str) -> bool:
        """True (and counted) while an outage says not to try Redis yet."""
        if self._outage_of(name).skip_redis():
            self.fallback_decisions += 1
            return True
        return False

    def _failed(self, exc: BaseException, op: str, name: str, strict: bool) -> None:
        """A script call failed: raise (``strict``: an operator asked) or let on_error decide."""
        if isinstance(exc, REDIS_DOWN):
            self._outage(exc, name)
            if strict:
                raise StoreUnavailableError(unreachable_message(self.client, exc)) from exc
        else:
            # Redis answered, but with an error (a key of the wrong type, OOM,
            # an ACL without EVALSHA): the shared state cannot be used either,
            # so on_error decides, as in an outage, and says why.
            if strict:
                raise StoreError(f"breaker {name!r}: Redis {op} script failed: {exc}") from exc
            self._outage(exc, name)
        self.fallback_decisions += 1

    def _succeeded(self, name: str) -> None:
        """A Redis call for breaker ``name`` worked: its outage, if any, is over."""
        outage = self._outage_of(name)
        if outage.started is None:
            return
        outage.ended(describe_client(self.client))
        if self._per_breaker:
            self._local.forget(name)  # the shared state is the truth again
            self.news.forget(name)
        else:
            self._local = MemoryStore()
            self.news.forget_views()

    def _outage(self, exc: BaseException, name: str | None = None) -> None:
        if self.on_store_error is not None:
            self.on_store_error(exc)
        message = unreachable_message(self.client, exc)
        if name is not None and self._per_breaker:
            # Cached "closed" views would skip on_error: this breaker must ask now.
            self._outage_of(name).failed(
                f"breaker {name!r}: {message}", lambda: self.news.forget(name)
            )
        else:
            self.outage.failed(message, self.news.forget_views)

    def _news_lost(self, exc: BaseException) -> None:
        """The news listener lost Redis: views must ask (on a cluster, no breaker's outage)."""
        if self._per_breaker:
            self.news.forget_views()
        else:
            self._outage(exc)


def _uncacheable(reply: Reply) -> Reply:
    return reply._replace(cacheable=False)


#: What a failed script call can raise that the stores turn into on_error.
SCRIPT_ERRORS = (redis.RedisError, OSError)
