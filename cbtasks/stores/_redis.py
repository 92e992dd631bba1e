"""RedisStore and AsyncRedisStore: breaker state shared through Redis, written once.

Each operation is one Lua script run with EVALSHA: one round trip, atomic,
timed by Redis's own clock (``TIME``), so hosts whose clocks disagree still
agree on when a circuit reopens. Keys are hash-tagged per breaker
(``cbtasks:{name}:s``, see ``_keys``) so every key of one breaker lives on one
Redis Cluster slot. A state change is published on ``<prefix>:news``; each
process listens in a background thread and updates its local views within
milliseconds.

The logic is written once for the blocking and the asyncio client.

Every operation is a *flow*: a generator that yields each Redis command it
needs (a tuple for ``execute_command``, or a :class:`Scan`) and is sent the
answer, or has the error thrown into it, then returns the operation's
result. :class:`~cbtasks.RedisStore` drives the flows with a blocking client,
:class:`~cbtasks.AsyncRedisStore` awaits each command on ``redis.asyncio``;
the line that does the I/O is the only difference between them, as httpx
drives ``Client`` and ``AsyncClient`` from one auth flow.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from .._errors import PolicyError, StoreError, StoreUnavailableError
from .._limit import LimitWire, describe_wire
from .._machine import CLOSED, HALF_OPEN, OPEN
from .._policy import PolicyWire
from .._state import STATE_BY_CODE, Mode
from ._base import BreakerStatus, CallResult, HistoryEntry, LimitStatus, LocalView, Reply
from ._connection import (
    ASYNCIO,
    BLOCKING,
    REDIS_DOWN,
    REDIS_TROUBLE,
    ClientKind,
    blocking_twin,
    describe_client,
    is_number,
    make_client,
    unreachable_message,
)
from ._keys import DEFAULT_PREFIX, breaker_keys, name_of_state_key, news_channel, state_keys_pattern
from ._memory import MemoryStore
from ._news import ProcessNews
from ._outage import OnError, Outage
from ._scripts import (
    SCRIPTS,
    LimitTail,
    SuccessReply,
    admit_reply,
    machine_reply,
    status_reply,
)

_MODES = frozenset(int(mode) for mode in Mode)

#: A script call: the script's name and its EVALSHA arguments after the sha.
ScriptCall = tuple[str, tuple[Any, ...]]

T = TypeVar("T")
P = ParamSpec("P")
S = TypeVar("S", bound="RedisStoreBase")


@dataclass(frozen=True, slots=True)
class Scan:
    """A flow's request for every key matching ``pattern`` (SCAN, on every node of a cluster)."""

    pattern: str


#: What a flow yields: the arguments of one ``execute_command``, or a Scan.
Request = tuple[Any, ...] | Scan
#: An operation: yields Requests, is sent their answers, returns its result.
Flow = Generator[Request, Any, T]


def drive(client: Any, flow: Flow[T]) -> T:
    """Run ``flow`` on a blocking client: each request sent, its answer (or error) handed back."""
    try:
        request = next(flow)
        while True:
            try:
                if isinstance(request, Scan):
                    answer: Any = list(client.scan_iter(match=request.pattern, count=500))
                else:
                    answer = client.execute_command(*request)
            except Exception as exc:  # the flow says what a failure means
                request = flow.throw(exc)
            else:
                request = flow.send(answer)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def adrive(client: Any, flow: Flow[T]) -> T:
    """Run ``flow`` on a ``redis.asyncio`` client, awaiting each request: :func:`drive`'s twin."""
    try:
        request = next(flow)
        while True:
            try:
                if isinstance(request, Scan):
                    scan = client.scan_iter(match=request.pattern, count=500)
                    answer: Any = [key async for key in scan]
                else:
                    answer = await client.execute_command(*request)
            except Exception as exc:  # the flow says what a failure means
                request = flow.throw(exc)
            else:
                request = flow.send(answer)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def blocking(flow: Callable[Concatenate[S, P], Flow[T]]) -> Callable[Concatenate[S, P], T]:
    """The store operation that drives ``flow`` with the store's blocking client."""

    @functools.wraps(flow)
    def operation(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return drive(self.client, flow(self, *args, **kwargs))

    return operation


def awaited(
    flow: Callable[Concatenate[S, P], Flow[T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """The store operation that drives ``flow``, awaiting each command on ``redis.asyncio``."""

    @functools.wraps(flow)
    async def operation(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await adrive(self.client, flow(self, *args, **kwargs))

    return operation


class RedisStoreBase:
    """Options, keys, replies, outages and the operations' flows of a store in Redis.

    A subclass says how it talks to Redis (``_kind``) and makes its
    operations from the flows with :func:`blocking` or :func:`awaited`.
    """

    #: How the store talks to Redis: a subclass says, blocking or asyncio.
    _kind: ClassVar[ClientKind] = BLOCKING

    def __init__(
        self,
        url_or_client: Any = "redis://localhost:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
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
        self.prefix = prefix
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.channel = news_channel(prefix)
        # A fake clock (tests) is sent to the scripts; else they read Redis TIME.
        self._fake_clock = clock
        self.local_clock: Callable[[], float] = clock or time.monotonic
        self._fixed: dict[str, tuple[bytes, ...]] = {}
        self._local = MemoryStore()
        self.outage = Outage(self.on_error, retry_interval)
        self._outages: dict[str, Outage] = {}
        #: Called with the exception each time a Redis call fails (metrics hook).
        self.on_store_error: Callable[[BaseException], None] | None = None
        self.client = make_client(url_or_client, timeout, self._kind)
        if self._kind is BLOCKING:
            news_client = self.client
        elif isinstance(url_or_client, str):
            news_client = make_client(url_or_client, timeout)
        else:  # the news listener is a thread: a blocking client to the same server
            news_client = blocking_twin(self.client, timeout)
        #: This process's views of the breakers; news makes them ask again.
        self.news = ProcessNews(news_client, prefix, self._news_lost, retry_interval)

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

    def remove_news_hook(self, hook: Callable[[str], None]) -> None:
        """Stop calling ``hook`` on news."""
        self.news.remove_hook(hook)

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

    # -- the operations, each a flow ---------------------------------------------

    def _admit(
        self, name: str, policy: PolicyWire, probe_id: str, tokens: int = 0, wait_ms: int = 0
    ) -> Flow[Reply]:
        """May a call go through? ``probe_id`` names it if it becomes a probe, and the
        slot it holds under the policy's limit, with ``tokens`` reserved."""
        limit = "" if policy.limit is None else policy.limit.encoded
        call = self._machine_call("admit", name, policy, probe_id, limit, probe_id, tokens, wait_ms)
        raw = yield from self._script(name, call)
        return self._admit_reply(raw, name, policy, probe_id, tokens, wait_ms)

    def _record(self, name: str, policy: PolicyWire, call: CallResult) -> Flow[Reply]:
        """Count how an admitted call went."""
        script = self._record_call(name, policy, call)
        raw = yield from self._script(name, script)
        return self._record_reply(raw, script[0], name, policy, call)

    def _control(
        self, name: str, policy: PolicyWire, op: str, by: str = "", why: str = ""
    ) -> Flow[Reply]:
        """An operator's command: force_open, force_close, force_half_open, reset, disable,
        enable (``by`` and ``why`` go to the history), or healthy."""
        call = self._machine_call("control", name, policy, op, by[:200], why[:500])
        return machine_reply((yield from self._script(name, call, strict=True)))

    def _history(self, name: str, since: float = 0.0, count: int = 100) -> Flow[list[HistoryEntry]]:
        """The breaker's newest ``count`` history entries since ``since``, oldest first."""
        key = breaker_keys(self.prefix, name).history
        start = f"{int(since * 1000)}-0" if since > 0 else "-"
        try:
            raw = yield ("XREVRANGE", key, "+", start, "COUNT", max(1, count))
        except REDIS_DOWN as exc:
            raise StoreUnavailableError(unreachable_message(self.client, exc)) from exc
        return [history_entry(entry_id, fields) for entry_id, fields in reversed(raw)]

    def _status(
        self, name: str, policy: PolicyWire, *, strict: bool = True
    ) -> Flow[BreakerStatus | None]:
        """The breaker as an operator sees it; None if it has no state, or (not
        ``strict``) while Redis is unreachable, which then costs no wait."""
        call = self._machine_call("status", name, policy)
        return self._status_from(name, (yield from self._script(name, call, strict=strict)))

    def _names(self) -> Flow[list[str]]:
        """Every breaker with state under this store's prefix (SCAN, not KEYS)."""
        try:
            keys = yield Scan(self._names_pattern)
        except REDIS_DOWN as exc:
            raise StoreUnavailableError(unreachable_message(self.client, exc)) from exc
        return self._names_from(keys)

    def _claim(self, name: str, what: str, ttl_ms: int) -> Flow[bool]:
        """Take the fleet's turn at ``what`` for breaker ``name`` for ``ttl_ms``."""
        key = self._claim_key(name, what)
        try:
            taken = yield ("SET", key, os.getpid(), "NX", "PX", max(1, ttl_ms))
        except REDIS_DOWN as exc:
            self._outage(exc, name)
            return False
        return bool(taken)

    def _ping(self) -> Flow[None]:
        """Raise StoreUnavailableError, saying what to check, if Redis is unreachable."""
        try:
            yield ("PING",)
        except REDIS_DOWN as exc:
            raise StoreUnavailableError(unreachable_message(self.client, exc)) from exc
        except redis.RedisError as exc:
            raise StoreError(
                f"Redis at {describe_client(self.client)} refused PING: {exc}"
            ) from exc

    def _script(self, name: str, call: ScriptCall, strict: bool = False) -> Flow[Any]:
        """One script call; None while Redis is unreachable (unless ``strict``)."""
        op, argv = call
        if not strict and self._skip_redis(name):
            return None
        try:
            reply = yield from SCRIPTS[op].run(*argv)
        except REDIS_TROUBLE as exc:
            self._failed(exc, op, name, strict)
            return None
        self._succeeded(name)
        return reply

    # -- the scripts' arguments ---------------------------------------------------

    def _machine_call(self, op: str, name: str, policy: PolicyWire, *args: Any) -> ScriptCall:
        """One of the machine's scripts: keys, channel and name, policy, time, then ``args``."""
        return op, (5, *self._fixed_arguments(name), policy.encoded, self._now_arg(), *args)

    def _record_call(self, name: str, policy: PolicyWire, call: CallResult) -> ScriptCall:
        if call.healthy and not policy.window_kind:
            # The healthy path: a small script that skips loading the machine.
            key = self._fixed_arguments(name)[0]
            return "success", (1, key, policy.open_ms, self._now_arg())
        jitter = repr(random.random()) if policy.jitter else "0"
        slow = 1 if call.slow else 0
        args: tuple[Any, ...] = (
            call.probe_id or "",
            int(call.outcome),
            slow,
            call.retry_after_ms,
            jitter,
        )
        if policy.limit is not None and call.limited:
            latency = repr(float(call.latency_ms))
            limit = (policy.limit.encoded, call.slot or "", call.reserved, call.used, latency)
            args = (*args, *limit)
        else:
            args = (*args, "", "", 0, -1, -1)
        return self._machine_call("record", name, policy, *args, call.failure)

    def _fixed_arguments(self, name: str) -> tuple[bytes, ...]:
        """A breaker's keys, the news channel and its name, encoded once."""
        fixed = self._fixed.get(name)
        if fixed is None:
            keys = breaker_keys(self.prefix, name)
            fixed = self._fixed[name] = tuple(
                s.encode()
                for s in (
                    keys.state,
                    keys.ring,
                    keys.probes,
                    keys.slots,
                    keys.history,
                    self.channel,
                    name,
                )
            )
        return fixed

    def _now_arg(self) -> str:
        """The time the scripts use: '' for Redis TIME, else the fake clock's, in ms."""
        return "" if self._fake_clock is None else str(int(self._fake_clock() * 1000))

    def _claim_key(self, name: str, what: str) -> str:
        return breaker_keys(self.prefix, name).claim(what)

    def _names_from(self, keys: list[bytes]) -> list[str]:
        return sorted({name_of_state_key(self.prefix, key) for key in keys})

    @property
    def _names_pattern(self) -> str:
        return state_keys_pattern(self.prefix)

    # -- replies ------------------------------------------------------------------

    def _admit_reply(
        self, raw: Any, name: str, policy: PolicyWire, probe_id: str, tokens: int, wait_ms: int
    ) -> Reply:
        if raw is None:
            if self.on_error is OnError.LOCAL:
                return _uncacheable(self._local.admit(name, policy, probe_id, tokens, wait_ms))
            admitted = self.on_error is OnError.ADMIT
            retry_ms = 0 if admitted else int(self.retry_interval * 1000)
            return _uncacheable(Reply(admitted, None, retry_ms, 0, 0, 0, 0, 0, ()))
        return admit_reply(raw, probe_id)

    def _record_reply(
        self, raw: Any, op: str, name: str, policy: PolicyWire, call: CallResult
    ) -> Reply:
        if raw is None:
            if self.on_error is OnError.LOCAL:
                return _uncacheable(self._local.record(name, policy, call))
            return _uncacheable(Reply(True, None, 0, 0, 0, 0, 0, 0, ()))
        if op != "success":
            return machine_reply(raw)
        if type(raw) is int:  # closed: version * 4 + mode
            return Reply(True, None, 0, CLOSED, 0, raw & 3, raw >> 2, 0, ())
        return Reply(True, None, 0, *SuccessReply(*raw), ())

    def _status_from(self, name: str, raw: Any) -> BreakerStatus | None:
        if raw is None:  # unreachable, and the caller asked not to raise
            return None
        exists, finish, counts, limit = status_reply(raw)
        state, remaining, mode = finish.state, finish.remaining_ms, finish.mode
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
            view.apply(state, remaining, mode, finish.version, self.local_clock())
        if not exists:
            return None
        return BreakerStatus(
            name=name,
            state=STATE_BY_CODE[state],
            mode=Mode(mode),
            open_until=counts.open_until / 1000 if state == OPEN else None,
            trips=counts.trips,
            consecutive_failures=counts.consecutive,
            window_calls=counts.calls,
            window_failures=counts.failures,
            window_slow=counts.slow,
            probes_in_use=counts.probes if state == HALF_OPEN else 0,
            retry_after=remaining / 1000 if state == OPEN else 0.0,
            limit=_limit_status(limit),
            last_failure=counts.last_failure.decode(errors="replace") or None,
            trips_total=counts.trips_total,
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
        return self._outage_of(name).skip_redis()

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


def history_entry(entry_id: bytes, fields: Any) -> HistoryEntry:
    """A history stream entry: its id is its time (ms), its fields what happened."""
    if isinstance(fields, dict):
        pairs = fields
    else:  # RESP2: a flat list of field, value, field, value ...
        pairs = dict(zip(fields[::2], fields[1::2], strict=True))
    text = {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode(errors="replace") if isinstance(v, bytes) else str(v)
        )
        for k, v in pairs.items()
    }
    at = int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0])
    return HistoryEntry(
        at=at / 1000,
        from_state=text.get("from"),
        to_state=text.get("to"),
        reason=text.get("reason", ""),
        failure=text.get("failure"),
        command=text.get("command"),
        by=text.get("by"),
        why=text.get("why"),
        state=text.get("state"),
    )


def _uncacheable(reply: Reply) -> Reply:
    return reply._replace(cacheable=False)


def _limit_status(tail: LimitTail) -> LimitStatus | None:
    """The limit status.lua read, if the breaker's workers use one."""
    wire = LimitWire.decode(tail.wire.decode()) if tail.wire else None
    if wire is None:
        return None
    return LimitStatus(
        allows=describe_wire(wire),
        in_flight=int(tail.in_flight),
        concurrency=float(tail.concurrency) if wire.counts_slots else None,
        admitted_last_second=int(tail.admitted_last_second),
        tokens_available=int(tail.tokens_available) if wire.token_ms else None,
    )


class RedisStore(RedisStoreBase):
    """Keeps breaker state in Redis, shared by every process that uses it.

    ``url_or_client`` is a ``redis://``, ``rediss://`` (TLS) or ``unix://``
    URL, credentials and TLS options included, or a ready ``redis.Redis``.
    ``timeout`` bounds every Redis call (seconds), so an outage never stalls
    a guarded call for long; ``on_error`` (an :class:`OnError` or its value)
    says what breakers do meanwhile. Redis is tried again every
    ``retry_interval`` seconds; until then calls skip it.
    """

    _kind = BLOCKING

    # -- the Store interface: the flows of RedisStoreBase, driven blocking ---------

    admit = blocking(RedisStoreBase._admit)
    record = blocking(RedisStoreBase._record)
    control = blocking(RedisStoreBase._control)
    history = blocking(RedisStoreBase._history)
    status = blocking(RedisStoreBase._status)
    names = blocking(RedisStoreBase._names)
    claim = blocking(RedisStoreBase._claim)
    ping = blocking(RedisStoreBase._ping)

    def refuse_one_cluster_node(self) -> None:
        """StoreError if a plain URL names one node of a Redis Cluster (it holds only some
        breakers): the URL should be ``redis+cluster://``."""
        if isinstance(self.client, RedisCluster):
            return
        try:
            enabled = self.client.info("cluster").get("cluster_enabled")
        except redis.RedisError:
            return
        if enabled:
            raise StoreError(
                f"{describe_client(self.client)} is a node of a Redis Cluster: use "
                "redis+cluster://host:port[,host:port...] to reach every node's breakers"
            )

    def close(self) -> None:
        """Stop the news listener and close the connections."""
        self.news.stop()
        self.client.close()

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRedisStore(RedisStoreBase):
    """Breaker state in Redis, for ``await breaker.acall(...)`` and ``async with breaker``.

    ``url_or_client`` is a Redis URL (as for :class:`RedisStore`) or a
    ``redis.asyncio.Redis``. Each method of the store is a coroutine; a
    breaker on this store is used through its async forms only.
    """

    _kind = ASYNCIO

    # -- the store interface: the flows of RedisStoreBase, each command awaited ----

    admit = awaited(RedisStoreBase._admit)
    record = awaited(RedisStoreBase._record)
    control = awaited(RedisStoreBase._control)
    history = awaited(RedisStoreBase._history)
    status = awaited(RedisStoreBase._status)
    names = awaited(RedisStoreBase._names)
    claim = awaited(RedisStoreBase._claim)
    ping = awaited(RedisStoreBase._ping)

    async def aclose(self) -> None:
        """Stop the news listener and close the connections."""
        self.news.stop()
        self.news.client.close()
        await self.client.aclose()
