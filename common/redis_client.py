"""Every Redis client npuserve opens is built here, from one URL, sync or asyncio alike.

URL forms (`--redis`, NPUSERVE_REDIS_URL):

- `redis://[USER@]HOST[:PORT][/DB]`: plain TCP;
- `rediss://[USER@]HOST[:PORT][/DB][?ssl_ca_certs=CA.pem]`: TLS, with the options redis-py
  reads from the query string: `ssl_ca_certs`, `ssl_certfile` and `ssl_keyfile` (a client
  certificate), `ssl_cert_reqs=none|optional|required`, `ssl_check_hostname=false`;
- `unix:///PATH/redis.sock[?db=N]`: a local socket;
- `redis+sentinel://[USER@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB][?...]`: the current master
  of SERVICE, as the sentinels at those addresses name it (port 26379 when left out);
  `rediss+sentinel://` speaks TLS to the sentinels and to the master, with the same options;
- `redis+cluster://[USER@]HOST:PORT[,HOST:PORT...][?...]`: a Redis Cluster, found from any
  of these nodes (`rediss+cluster://` for TLS; common.redis_cluster).

The password (`RedisConfig.password()`: `--redis-password-file` or NPUSERVE_REDIS_PASSWORD)
goes to the data connections, with the URL's user; it never needs to be in the URL.
Sentinels are asked without a password unless NPUSERVE_REDIS_SENTINEL_PASSWORD gives theirs
(`RedisConfig.sentinel_password()`).

A client of a sentinel URL asks the sentinels for the master on every new connection; a
connection that finds the master gone (a connection error) or demoted (READONLY) is dropped,
and the caller's retry reconnects to whichever server the sentinels promoted. Reads do not
fail on a demoted master, so gateways and workers also ask the sentinels every heartbeat
(`master_moved`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.sentinel

from common.config import RedisConfig
from common.errors import InvalidRequestError, UnavailableError
from common.redis_cluster import cluster_async, cluster_sync, is_cluster
from common.redis_credentials import redact, refused_credentials
from common.redis_url import parse_multi_host

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
"""Sentinel URL schemes -> whether they use TLS."""
QUIET = {"driver_info": None}
"""No CLIENT SETINFO on connecting: one round trip less, and no command the ACL users of
deploy/redis would have to allow (Redis before 7.2 does not know it, so they cannot)."""
SENTINEL_PORT = 26379
SENTINEL_TIMEOUT_S = 1.0
"""Reply timeout of one question to one sentinel: a hung sentinel costs this, then the next
one is asked."""


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A parsed `redis+sentinel://` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    """The master's name in the sentinels' configuration (`sentinel monitor NAME ...`)."""
    db: int = 0
    username: str | None = None
    password: str | None = None
    """A password written in the URL (better given by file or environment)."""
    tls: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    """Query-string connection options (ssl_ca_certs, ...), typed as redis-py types them."""


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def _bad(url: str, why: str) -> InvalidRequestError:
    from common.redis_credentials import redact

    return InvalidRequestError("redis", f"{why} in {redact(url)!r}; a sentinel URL reads "
                               "redis+sentinel://[USER@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]")


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Split a sentinel URL into its parts; InvalidRequestError naming what is wrong."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise _bad(url, "not a sentinel URL")
    parsed = parse_multi_host(url, default_port=SENTINEL_PORT, what="sentinel address",
                              bad=lambda why: _bad(url, why))
    path, options = parsed.path, parsed.options
    if not path or len(path) > 2:
        raise _bad(url, "the path must be /SERVICE or /SERVICE/DB")
    try:
        db = int(path[1]) if len(path) == 2 else int(options.pop("db", 0))
    except ValueError:
        raise _bad(url, "the database must be a number") from None
    return SentinelTarget(tuple(parsed.hosts), path[0], db, parsed.username, parsed.password,
                          SENTINEL_SCHEMES[scheme.lower()], options)


def _sentinel_args(target: SentinelTarget, password: str | None, options: dict[str, Any]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keyword arguments of the master's connections, those of the sentinels')."""
    sentinel_password = RedisConfig.sentinel_password()
    ssl = {k: v for k, v in target.options.items() if k.startswith("ssl_")}
    master: dict[str, Any] = {**target.options, **options, "db": target.db}
    if target.username:
        master["username"] = target.username
    if password is not None or target.password is not None:
        master["password"] = password if password is not None else target.password
    sentinels: dict[str, Any] = {
        "socket_connect_timeout": options.get("socket_connect_timeout", SENTINEL_TIMEOUT_S),
        "socket_timeout": SENTINEL_TIMEOUT_S, "decode_responses": True, **QUIET}
    if sentinel_password is not None:
        sentinels["password"] = sentinel_password
    if target.tls:
        master["ssl"] = True
        sentinels.update(ssl, ssl=True)
    return master, sentinels


class _SentinelRedis(redis.Redis):
    """A master's client that also closes its connections to the sentinels."""

    def close(self) -> None:
        super().close()
        cast(Any, self.connection_pool).sentinel_manager.close()


class _AsyncSentinelRedis(aioredis.Redis):
    """The asyncio master's client that also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await cast(Any, self.connection_pool).sentinel_manager.aclose()


def connect_sync(url: str, *, password: str | None = None, **options: Any) -> redis.Redis:
    """A synchronous client of `url` (any form above); `password` overrides the URL's;
    `options` are redis-py connection options (timeouts, retry, decode_responses)."""
    if is_cluster(url):
        return cast(redis.Redis, cluster_sync(url, password=password, **options))
    options = {**QUIET, **options}
    if not is_sentinel(url):
        extra: dict[str, Any] = {} if password is None else {"password": password}
        return redis.Redis.from_url(url, **extra, **options)
    target = parse_sentinel_url(url)
    master, sentinels = _sentinel_args(target, password, options)
    manager: Any = redis.sentinel.Sentinel
    client: redis.Redis = manager(list(target.sentinels), sentinel_kwargs=sentinels
                                  ).master_for(target.service, redis_class=_SentinelRedis,
                                               **master)
    return client


def connect_async(url: str, *, password: str | None = None,
                  **options: Any) -> aioredis.Redis:
    """The asyncio client of `url`, as `connect_sync` builds the synchronous one."""
    if is_cluster(url):
        return cast(aioredis.Redis, cluster_async(url, password=password, **options))
    options = {**QUIET, **options}
    if not is_sentinel(url):
        extra: dict[str, Any] = {} if password is None else {"password": password}
        return aioredis.Redis.from_url(url, **extra, **options)
    target = parse_sentinel_url(url)
    master, sentinels = _sentinel_args(target, password, options)
    manager: Any = aiosentinel.Sentinel
    client: aioredis.Redis = manager(list(target.sentinels), sentinel_kwargs=sentinels
                                     ).master_for(target.service,
                                                  redis_class=_AsyncSentinelRedis, **master)
    return client


def master_moved(client: redis.Redis) -> bool:
    """For a client of a sentinel URL: ask the sentinels which server is master now; True
    when it is not the one the client's connections went to. Those connections are then
    dropped (idle ones at once, busy ones when released), so the next command reaches the
    new master even though none of the client's commands failed: a failover while its
    connections were idle, or away from a master that was only slow and still answers.
    False for any other client. Raises MasterNotFoundError (a ConnectionError) while no
    sentinel names a master."""
    pool: Any = getattr(client, "connection_pool", None)  # a cluster client has none
    if not isinstance(pool, redis.sentinel.SentinelConnectionPool):
        return False
    before, sentinels = pool.master_address, cast(Any, pool)
    return before is not None and sentinels.get_master_address() != before


async def master_moved_async(client: aioredis.Redis) -> bool:
    """`master_moved` for an asyncio client."""
    pool: Any = getattr(client, "connection_pool", None)  # a cluster client has none
    if not isinstance(pool, aiosentinel.SentinelConnectionPool):
        return False
    before, sentinels = pool.master_address, cast(Any, pool)
    return before is not None and await sentinels.get_master_address() != before


def ping_within(client: redis.Redis, url: str, wait_s: float) -> Exception | None:
    """PING until Redis answers. Refused credentials raise UnavailableError at once; an
    unreachable Redis raises it after `wait_s`, saying what to do, or with `wait_s` 0 is
    returned (the caller decides to retry later). None once Redis answered."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.ping()
            return None
        except redis.AuthenticationError as exc:
            raise UnavailableError(refused_credentials(url, exc)) from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if wait_s <= 0:
                return exc
            if time.monotonic() >= deadline:
                raise UnavailableError(
                    f"Redis at {redact(url)} is unreachable ({exc}): start redis-server "
                    "there, or point --redis (NPUSERVE_REDIS_URL) at a running one") from None
            time.sleep(0.5)
