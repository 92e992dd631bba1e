"""Redis clients for the stores: short timeouts, no retries, and URLs told without passwords."""

from __future__ import annotations

import re

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .._errors import PolicyError

# Errors that mean "Redis cannot be reached now", as opposed to a bug.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)
# Those, or Redis answering with an error (a key of the wrong type, OOM, ACL):
# what a task's own Redis calls (completion guard, cache, parking) survive.
REDIS_TROUBLE = (redis.RedisError, OSError)


def make_client(url_or_client: str | redis.Redis, timeout: float) -> redis.Redis:
    """A client for ``url_or_client`` whose every call gives up after ``timeout`` seconds."""
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
        why = scrub(str(exc), url_or_client)
        raise PolicyError(
            f"malformed Redis URL {redact_url(url_or_client)!r}: {why}. "
            "Characters such as '/', '#', '?' or '@' in a password must be percent-encoded. "
            "Use redis://[:password@]host:port/db, rediss://... for TLS, or unix:///path"
        ) from None


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


def unreachable_message(client: redis.Redis, exc: BaseException) -> str:
    """What went wrong talking to Redis, and what to check; never the password."""
    if not isinstance(exc, REDIS_DOWN):
        return (
            f"Redis at {describe_client(client)} refused the breaker's scripts "
            f"({type(exc).__name__}: {exc}); check its keys, memory and ACL"
        )
    return (
        f"cannot reach Redis at {describe_client(client)} "
        f"({type(exc).__name__}: {exc}); check that it runs and that the URL is right"
    )


def is_number(value: object) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)
