"""URL forms for more than one Redis: a cluster and a Sentinel-watched master.

    redis+cluster://[user:password@]host:port[,host:port...][?option=value...]
    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db][?...]
    sentinel://[:password@]host:port[/db];sentinel://host:port...?master_name=name

The last is kombu's, which every Celery user already writes for a broker
behind Sentinel; there kombu takes the master's name from
``broker_transport_options["master_name"]`` (cbtasks does too, when the
breaker state lives in the broker's Redis) or a ``master_name`` option.

``rediss+cluster://`` and ``rediss+sentinel://`` use TLS. The query takes the
options of a plain Redis URL (``ssl_cert_reqs``, ``ssl_ca_certs``,
``client_name``, ...). The credentials are the data nodes' (for Sentinel, the
master's and replicas'; the sentinels themselves are asked without them
unless ``sentinel_password`` is given).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from .._errors import PolicyError

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: kombu's Sentinel form: ``sentinel://host:port;sentinel://host:port``.
KOMBU_SENTINEL = "sentinel"
_FORMS = (
    "redis+cluster://[user:password@]host:port[,host:port...] or "
    "redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]"
)
#: Every form a store takes, for messages that must name them.
ACCEPTED_FORMS = (
    "redis://[[user]:password@]host:port/db, rediss://... for TLS, unix:///path, "
    "redis+cluster://host:port,host:port, redis+sentinel://host:port,host:port/master_name, "
    "or kombu's sentinel://host:port;sentinel://host:port?master_name=name"
)


@dataclass(frozen=True)
class MultiNodeURL:
    """A parsed cluster or Sentinel URL."""

    kind: str  # "cluster" or "sentinel"
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    service: str | None = None
    db: int = 0
    options: dict[str, str] = field(default_factory=dict)


def is_multi_node(url: str) -> bool:
    scheme = url.partition("://")[0].lower()
    return scheme in (*CLUSTER_SCHEMES, *SENTINEL_SCHEMES, KOMBU_SENTINEL)


def parse_multi_node(url: str, master_name: str | None = None) -> MultiNodeURL:
    """The parts of a cluster or Sentinel URL, or PolicyError saying what to write.

    ``master_name`` names the service of kombu's ``sentinel://`` form when the
    URL has no ``master_name`` option (the broker's transport options say it).
    """
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == KOMBU_SENTINEL:
        return _kombu_sentinel(url, master_name)
    kind = "cluster" if scheme in CLUSTER_SCHEMES else "sentinel"
    rest, _, query = rest.partition("?")
    credentials, at, rest = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
        if not colon:  # redis://secret@host: a password alone
            username, password = None, unquote(user)
    hosts, _, path = rest.partition("/")
    nodes = tuple(_node(part) for part in hosts.split(",") if part)
    if not nodes:
        raise PolicyError(f"no host:port in the Redis URL; use {_FORMS}")
    service, db = None, 0
    parts = [p for p in path.split("/") if p]
    if kind == "sentinel":
        if not parts or len(parts) > 2:
            raise PolicyError(
                "a Sentinel URL names the service after the hosts: "
                "redis+sentinel://host:26379,host:26380/mymaster[/db]"
            )
        service = unquote(parts[0])
        db = _db(parts[1]) if len(parts) == 2 else 0
    elif parts:
        raise PolicyError(
            "a cluster has no database number or path: "
            "redis+cluster://host:7000,host:7001 (every node serves db 0)"
        )
    return MultiNodeURL(
        kind=kind,
        tls=scheme.startswith("rediss"),
        nodes=nodes,
        username=username,
        password=password,
        service=service,
        db=db,
        options=dict(parse_qsl(query)),
    )


def _kombu_sentinel(url: str, master_name: str | None) -> MultiNodeURL:
    """kombu's ``sentinel://[:password@]host:port[/db];sentinel://host:port...`` form."""
    text, _, query = url.partition("?")
    options = dict(parse_qsl(query))
    service = options.pop("master_name", None) or master_name
    if not service:
        raise PolicyError(
            "a sentinel:// URL needs the master's name: add ?master_name=mymaster, or set "
            "broker_transport_options={'master_name': 'mymaster'} when it is the broker's URL"
        )
    nodes, username, password, db = [], None, None, 0
    for part in text.split(";"):
        scheme, sep, rest = part.strip().partition("://")
        if scheme.lower() != KOMBU_SENTINEL or not sep:
            raise PolicyError(
                f"{part!r} is not sentinel://host:port; kombu's form is "
                "sentinel://host:port;sentinel://host:port"
            )
        credentials, at, rest = rest.rpartition("@")
        if at:
            user, colon, secret = credentials.partition(":")
            username = unquote(user) or username
            password = unquote(secret) if colon else unquote(user)
        host, _, path = rest.partition("/")
        nodes.append(_node(host))
        if path.strip("/"):
            db = _db(path.strip("/"))
    return MultiNodeURL(
        kind="sentinel",
        tls=False,
        nodes=tuple(nodes),
        username=username,
        password=password,
        service=service,
        db=db,
        options=options,
    )


def node_options(parsed: MultiNodeURL) -> tuple[dict[str, Any], str | None]:
    """Keyword arguments for the data nodes' clients, and the sentinels' own password."""
    options: dict[str, Any] = {
        **parsed.options,
        "username": parsed.username,
        "password": parsed.password,
    }
    if parsed.tls:
        options["ssl"] = True
    return options, options.pop("sentinel_password", None)


def describe(parsed: MultiNodeURL) -> str:
    """The URL again, without its password."""
    scheme = ("rediss+" if parsed.tls else "redis+") + parsed.kind
    hosts = ",".join(f"{host}:{port}" for host, port in parsed.nodes)
    tail = f"/{parsed.service}/{parsed.db}" if parsed.kind == "sentinel" else ""
    return f"{scheme}://{hosts}{tail}"


def _node(part: str) -> tuple[str, int]:
    host, colon, port = part.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PolicyError(f"{part!r} in the Redis URL is not host:port; use {_FORMS}")
    return host.strip("[]"), int(port)


def _db(text: str) -> int:
    if not text.isdigit():
        raise PolicyError(f"the database after the Sentinel service must be a number, got {text!r}")
    return int(text)
