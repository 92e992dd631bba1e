"""Redis clients for the stores: short timeouts, no retries, and URLs told without passwords."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterDownError, MovedError, RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from .._errors import PolicyError
from ._urls import ACCEPTED_FORMS, MultiNodeURL, is_multi_node, node_options, parse_multi_node

# Errors that mean "Redis cannot be reached now", as opposed to a bug: on a
# cluster, a node lost or the cluster down too (Sentinel's "no master" is a
# ConnectionError already).
REDIS_DOWN = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    ClusterDownError,
    RedisClusterException,
)
# Those, or Redis answering with an error (a key of the wrong type, OOM, ACL):
# "Redis trouble", the one tuple every caller of Redis catches (the stores'
# scripts turn it into on_error; a task's own calls, the completion guard,
# cache and parking, survive it). RedisClusterException is no RedisError: a
# cluster none of whose nodes answers raises RedisClusterUnreachableError.
REDIS_TROUBLE = (redis.RedisError, OSError, RedisClusterException)


@dataclass(frozen=True)
class ClientKind:
    """redis-py's classes for one way of talking to Redis: blocking, or asyncio."""

    redis: Any
    cluster: Any
    node: Any
    sentinel: Any
    retry: Any
    store: str
    client: str


BLOCKING = ClientKind(
    redis.Redis, RedisCluster, ClusterNode, Sentinel, Retry, "RedisStore", "redis.Redis"
)
ASYNCIO = ClientKind(
    aredis.Redis,
    AsyncRedisCluster,
    AsyncClusterNode,
    AsyncSentinel,
    AsyncRetry,
    "AsyncRedisStore",
    "redis.asyncio.Redis",
)


def make_client(
    url_or_client: Any,
    timeout: float,
    kind: ClientKind = BLOCKING,
    master_name: str | None = None,
) -> Any:
    """A client for ``url_or_client`` whose every call gives up after ``timeout`` seconds.

    A plain ``redis://``, ``rediss://`` or ``unix://`` URL, a cluster or
    Sentinel URL (see ``_urls``; ``master_name`` for kombu's ``sentinel://``
    form), or a ready client of ``kind`` (blocking or asyncio): a ``Redis``
    (Sentinel's ``master_for`` makes one) or a ``RedisCluster``, whose
    timeouts and retries are then set to the store's. A URL of another form,
    or with an option redis-py does not know, is a PolicyError now, not a
    TypeError at the first call.
    """
    if isinstance(url_or_client, kind.redis | kind.cluster):
        return bound(url_or_client, timeout)
    if not isinstance(url_or_client, str):
        raise PolicyError(
            f"{kind.store} needs a Redis URL, a {kind.client} or a RedisCluster client, "
            f"got {type(url_or_client).__name__}"
        )
    try:
        if is_multi_node(url_or_client):
            parsed = parse_multi_node(url_or_client, master_name)
            return _multi_node_client(parsed, timeout, kind)
        scheme = url_or_client.partition("://")[0].lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise PolicyError(
                f"Redis URL {redact_url(url_or_client)!r}: unknown scheme {scheme!r}; "
                f"use {ACCEPTED_FORMS}"
            )
        client = kind.redis.from_url(
            url_or_client, **_limits(timeout, kind), health_check_interval=30
        )
    except (ValueError, TypeError) as exc:
        why = scrub(str(exc), url_or_client)
        raise PolicyError(
            f"malformed Redis URL {redact_url(url_or_client)!r}: {why}. "
            "Characters such as '/', '#', '?' or '@' in a password must be percent-encoded. "
            f"Use {ACCEPTED_FORMS}"
        ) from None
    _refuse_unknown_options(client.connection_pool, url_or_client)
    return client


def check_url(url: str) -> None:
    """PolicyError if ``url`` cannot make a store's client; never connects (a worker's
    start checks its settings whether or not Redis is up yet)."""
    if is_multi_node(url):
        parse_multi_node(url, master_name="-")  # the master's name is checked where it is set
        return
    client = make_client(url, 1.0)
    client.close()


def _refuse_unknown_options(pool: Any, url: str) -> None:
    """PolicyError for a URL option the connection would refuse at its first use.

    redis-py passes a query option it does not parse itself to the
    connection's constructor, which raises TypeError when the first command
    connects (a typo, ``?sentinel=mymaster``): say so now, naming it.
    """
    known: set[str] = set()
    for cls in pool.connection_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            known.update(inspect.signature(init).parameters)
    unknown = sorted(key for key in pool.connection_kwargs if key not in known)
    if unknown:
        sentinel = (
            "; for a master behind Sentinel write redis+sentinel://host:port/master_name"
            if "sentinel" in unknown
            else ""
        )
        raise PolicyError(
            f"Redis URL {redact_url(url)!r}: redis-py does not know the option(s) "
            f"{', '.join(unknown)}{sentinel}; accepted forms: {ACCEPTED_FORMS}"
        )


def _limits(timeout: float, kind: ClientKind) -> dict[str, Any]:
    # One try per call: on_error decides, rather than 10 retries stalling it.
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": kind.retry(NoBackoff(), 0),
    }


def bound(client: Any, timeout: float) -> Any:
    """``client`` with the store's timeout and no retries, on every node it talks to."""
    if isinstance(client, AsyncRedisCluster):
        client.retry = AsyncRetry(NoBackoff(), 0)
        for node in client.get_nodes():
            node.connection_kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout)
        return client
    client.set_retry((AsyncRetry if isinstance(client, aredis.Redis) else Retry)(NoBackoff(), 0))
    if isinstance(client, RedisCluster):
        nodes = client.get_nodes()  # type: ignore[no-untyped-call, unused-ignore]
        pools = [node.redis_connection.connection_pool for node in nodes if node.redis_connection]
    else:
        pools = [client.connection_pool]
    for pool in pools:
        pool.connection_kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout)
        if not isinstance(client, aredis.Redis):
            pool.disconnect()  # connections made before use the new limits when remade
    return client


def _multi_node_client(url: MultiNodeURL, timeout: float, kind: ClientKind) -> Any:
    options, sentinel_password = node_options(url)
    if url.kind == "cluster":
        nodes = [kind.node(host, port) for host, port in url.nodes]
        return kind.cluster(startup_nodes=nodes, **_limits(timeout, kind), **options)
    sentinel = kind.sentinel(
        list(url.nodes),
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "password": sentinel_password,
        },
        **_limits(timeout, kind),
    )
    return sentinel.master_for(url.service, db=url.db, **options)


# What a blocking client needs to reach the server an asyncio client reaches.
_TWIN_KEYS = ("host", "port", "db", "path", "username", "password", "credential_provider")


def blocking_twin(client: Any, timeout: float) -> Any:
    """A blocking client to the server an asyncio ``client`` reaches (for the news thread)."""
    if isinstance(client, AsyncRedisCluster):
        nodes = client.nodes_manager.startup_nodes.values()
        twin = [ClusterNode(node.host, node.port) for node in nodes]  # type: ignore[no-untyped-call, unused-ignore]
        kwargs = client.connection_kwargs
        return make_client(
            RedisCluster(
                startup_nodes=twin, username=kwargs.get("username"), password=kwargs.get("password")
            ),
            timeout,
        )
    pool = client.connection_pool
    kwargs = {
        key: value
        for key, value in pool.connection_kwargs.items()
        if key in _TWIN_KEYS or key.startswith("ssl_")
    }
    connection_class = getattr(redis.connection, pool.connection_class.__name__, redis.Connection)
    return redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=connection_class,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            **kwargs,
        )
    )


def password_of(url: str) -> str:
    """The password in ``url`` as written (everything between the user and the last '@')."""
    _, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return ""
    credentials = rest.rpartition("@")[0]
    return credentials.partition(":")[2] if ":" in credentials else credentials


def scrub(text: str, url: str) -> str:
    """``text`` without the password of ``url``, whole or any piece a parser split off."""
    password = password_of(url)
    if not password:
        return text
    pieces = sorted({password, *re.split(r"[/#?@:]", password)}, key=len, reverse=True)
    for piece in pieces:
        if len(piece) >= 3 or piece == password:
            text = text.replace(piece, "***")
    return text


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0] if ":" in credentials else ""
    return scrub(f"{scheme}://{user}:***@{host}" if user else f"{scheme}://***@{host}", url)


def describe_client(client: Any) -> str:
    """Where a client connects, never with its password."""
    if hasattr(client, "nodes_manager"):  # a RedisCluster, blocking or asyncio
        hosts = ",".join(f"{n.host}:{n.port}" for n in client.nodes_manager.startup_nodes.values())
        return f"redis+cluster://{hosts}"
    pool = client.connection_pool
    manager = getattr(pool, "sentinel_manager", None)
    if manager is not None:  # made by Sentinel.master_for
        hosts = ",".join(
            "{host}:{port}".format(**s.connection_pool.connection_kwargs) for s in manager.sentinels
        )
        return f"redis+sentinel://{hosts}/{pool.service_name}"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = "rediss" if pool.connection_class.__name__ == "SSLConnection" else "redis"
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"{scheme}://{host}:{port}/{kwargs.get('db', 0)}"


def unreachable_message(client: Any, exc: BaseException) -> str:
    """What went wrong talking to Redis, and what to check; never the password."""
    if isinstance(exc, MovedError):
        return (
            f"Redis at {describe_client(client)} is a node of a Redis Cluster and the breaker's "
            f"keys live on another ({exc}); use redis+cluster://host:port[,host:port...]"
        )
    if not isinstance(exc, REDIS_DOWN):
        return (
            f"Redis at {describe_client(client)} refused the breaker's scripts "
            f"({cause(exc)}); check its keys, memory and ACL"
        )
    return (
        f"cannot reach Redis at {describe_client(client)} "
        f"({cause(exc)}); check that it runs and that the URL is right"
    )


#: A cause in a log line is one line of at most this many characters.
CAUSE_CHARACTERS = 200


def cause(exc: BaseException) -> str:
    """One short line saying what ``exc`` was: never a library's repr of its clients.

    redis-py's MasterNotFoundError (every sentinel asked, none knew a master)
    repeats the repr of each sentinel's client, connection pool and retry
    objects: 3,000 characters a line. Its first error is what an operator needs.
    """
    name = type(exc).__name__
    text = str(exc)
    if name == "MasterNotFoundError":
        first = re.search(r"(Error \d+[^,}'\"]*|Connection refused|Timeout[^,}'\"]*)", text)
        service = re.match(r"No master found for '([^']*)'", text)
        said = f"no sentinel knows a master for {service.group(1)!r}" if service else "no master"
        text = f"{said}; first error: {first.group(1) if first else 'none said'}"
    line = text.splitlines()[0] if text else ""
    if len(line) > CAUSE_CHARACTERS:
        line = line[: CAUSE_CHARACTERS - 3] + "..."
    return f"{name}: {line}"


def is_number(value: object) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)
