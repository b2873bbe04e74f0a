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

from typing import Any

import redis.asyncio.cluster as aiocluster
import redis.cluster
from redis.exceptions import RedisClusterException

from common.errors import InvalidRequestError, UnavailableError
from common.redis_url import parse_multi_host

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
    parsed = parse_multi_host(url, default_port=DEFAULT_PORT, what="node address",
                              bad=lambda why: _bad(url, why))
    if parsed.path not in ([], ["0"]):
        raise _bad(url, "a cluster has only database 0")
    options = dict(parsed.options)
    if parsed.username:
        options["username"] = parsed.username
    if parsed.password is not None:
        options["password"] = parsed.password
    if CLUSTER_SCHEMES[scheme.lower()]:
        options["ssl"] = True
    return parsed.hosts, options


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
