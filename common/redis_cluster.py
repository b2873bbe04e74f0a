"""Redis Cluster clients: `redis+cluster://[USER@]HOST:PORT[,HOST:PORT...][?OPTIONS]`.

The addresses are startup nodes: any reachable one tells the client the whole cluster's
layout, and the client follows it as slots move (MOVED, ASK) and masters fail over.
`rediss+cluster://` speaks TLS, with the query options `rediss://` takes (ssl_ca_certs, ...).
A cluster has one database, so the URL names none.

npuserve's keys are hash-tagged (common.keys) so every script and transaction stays in one
slot: one model's queue and requests, one gateway's stream, one API key's counters. A
single model's queue lives on one shard; many models, gateways and API keys spread out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio.cluster as aiocluster
import redis.cluster
from redis.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.exceptions import RedisClusterException

from common.errors import InvalidRequestError, UnavailableError

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
"""Cluster URL schemes -> whether they use TLS."""
DEFAULT_PORT = 6379
_NOT_FOR_CLUSTER = ("retry",)
"""Caller options a cluster client does not take as given: it retries a command itself
when a slot moves or a master fails over (cluster_error_retry_attempts)."""


def is_cluster(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def _bad(url: str, why: str) -> InvalidRequestError:
    from common.redis_credentials import redact

    return InvalidRequestError("redis", f"{why} in {redact(url)!r}; a cluster URL reads "
                               "redis+cluster://[USER@]HOST:PORT[,HOST:PORT...]")


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The startup nodes and the connection options (user, password, TLS) of a cluster URL;
    InvalidRequestError naming what is wrong."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise _bad(url, "not a cluster URL")
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", parts.netloc
    nodes = []
    for item in (h for h in hosts.split(",") if h):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            number = int(port) if port else DEFAULT_PORT
        except ValueError:
            raise _bad(url, f"node address {item!r} has a bad port") from None
        if not host or not 0 < number < 65536:
            raise _bad(url, f"node address {item!r} is not HOST:PORT")
        nodes.append((unquote(host), number))
    if not nodes:
        raise _bad(url, "no node address")
    if parts.path.strip("/") not in ("", "0"):
        raise _bad(url, "a cluster has only database 0")
    options: dict[str, Any] = {}
    user, colon, password = userinfo.partition(":")
    if user:
        options["username"] = unquote(user)
    if colon:
        options["password"] = unquote(password)
    for name, values in parse_qs(parts.query).items():
        parser = cast(Callable[[str], Any] | None, URL_QUERY_ARGUMENT_PARSERS.get(name))
        try:
            options[name] = parser(values[0]) if parser else values[0]
        except (TypeError, ValueError):
            raise _bad(url, f"option {name} has a bad value") from None
    if CLUSTER_SCHEMES[scheme.lower()]:
        options["ssl"] = True
    return nodes, options


def _options(url: str, password: str | None, options: dict[str, Any]
             ) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    nodes, from_url = parse_cluster_url(url)
    merged = {**from_url, **{k: v for k, v in options.items() if k not in _NOT_FOR_CLUSTER}}
    if password is not None:
        merged["password"] = password
    return nodes, merged


def cluster_sync(url: str, *, password: str | None = None,
                 **options: Any) -> redis.cluster.RedisCluster:
    """A synchronous client of the cluster a `redis+cluster://` URL names; UnavailableError
    when no startup node answers (the client needs the cluster's layout to exist)."""
    nodes, merged = _options(url, password, options)
    try:
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
                           for host, port in nodes],
            **merged)
    except RedisClusterException as exc:  # it reads the cluster's layout right away
        from common.redis_credentials import redact

        raise UnavailableError(f"Redis Cluster at {redact(url)} is unreachable: {exc}"
                               ) from None


def cluster_async(url: str, *, password: str | None = None,
                  **options: Any) -> aiocluster.RedisCluster:
    """The asyncio client of the cluster a `redis+cluster://` URL names."""
    nodes, merged = _options(url, password, options)
    return aiocluster.RedisCluster(
        startup_nodes=[aiocluster.ClusterNode(host, port) for host, port in nodes], **merged)
