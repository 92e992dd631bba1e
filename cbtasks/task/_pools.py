"""What a worker pool that runs tasks side by side in one process needs of a Redis broker.

With ``acks_late`` a task acknowledges its message when it ends, from where it
ran: under ``gevent`` and ``eventlet`` that is many greenlets of one process at
once, each taking a connection from the broker channel's pool. kombu's Redis
channel allows 10 (``max_connections``, a ``broker_transport_options`` key);
the 11th ack at once fails with "Couldn't ack ... Too many connections" and
its message stays unacknowledged until the visibility timeout brings it back
(an hour by default). A pool of 64 greenlets
meets that as soon as a backlog runs (seen when a paused queue resumed: tasks
stuck for the visibility timeout; tests/test_pools.py stalls the broker for
a moment to make every ack wait at once). prefork and solo acknowledge from
the worker's main process, one at a time; ``threads`` passes the same test
without more room.
"""

from __future__ import annotations

import logging
from typing import Any

#: kombu.transport.redis.Channel.max_connections: its default.
KOMBU_REDIS_CONNECTIONS = 10
#: Connections the consumer itself holds beside the acks (its BRPOP, restores, publishes).
CONSUMER_CONNECTIONS = 10
#: Pools whose tasks of one process acknowledge side by side.
SHARED_PROCESS_POOLS = ("gevent", "eventlet")


def pool_name(pool_cls: Any) -> str:
    """``prefork``, ``threads``, ``gevent``... from a worker's pool (a name or a class)."""
    if isinstance(pool_cls, str):
        name = pool_cls.rsplit(":", 1)[0].rsplit(".", 1)[-1]
    else:
        name = getattr(pool_cls, "__module__", "").rsplit(".", 1)[-1]
    return {"thread": "threads", "processes": "prefork"}.get(name, name)


def fit_broker_connections(app: Any, worker: Any) -> tuple[int, str] | None:
    """Make room in the Redis broker's connection pool for every task of ``worker`` to
    acknowledge at once; what it did (INFO) or what to change (WARNING), as a log level
    and a message, or None.

    Set only where the app does not say (``broker_transport_options`` without
    ``max_connections``); a value of the app's own below the concurrency is
    left as it is, with a warning that names it.
    """
    concurrency = int(getattr(worker, "concurrency", 0) or 0)
    pool = pool_name(getattr(worker, "pool_cls", ""))
    broker = str(app.conf.broker_url or "")
    if pool not in SHARED_PROCESS_POOLS or not broker.startswith(("redis", "rediss", "sentinel")):
        return None
    need = concurrency + CONSUMER_CONNECTIONS
    options = dict(app.conf.broker_transport_options or {})
    given = options.get("max_connections")
    if given is None:
        if need <= KOMBU_REDIS_CONNECTIONS:
            return None
        options["max_connections"] = need
        app.conf.broker_transport_options = options
        return logging.INFO, (
            f"the {pool} pool runs {concurrency} tasks in one process, each acknowledging "
            f"its message: broker_transport_options['max_connections'] set to {need} "
            f"(kombu's default, {KOMBU_REDIS_CONNECTIONS}, loses acks beyond it)"
        )
    if int(given) < concurrency:
        return logging.WARNING, (
            f"broker_transport_options['max_connections'] is {given}, below the {pool} pool's "
            f"concurrency ({concurrency}): acks beyond it fail ('Couldn't ack ... Too many "
            f"connections') and their messages wait for the visibility timeout; raise it to "
            f"{need}"
        )
    return None
