"""Redis URLs: every form builds a client of the right kind, sentinel URLs parse into their
parts (or fail naming what is wrong), and no form ever shows its password in a log line."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.sentinel

from common.errors import InvalidRequestError
from common.redis_client import SentinelTarget, connect_async, connect_sync, parse_sentinel_url
from common.redis_credentials import redact


def test_a_sentinel_url_names_its_sentinels_service_and_database() -> None:
    assert parse_sentinel_url("redis+sentinel://s1:26380,s2,[::1]:5000/mymaster/2") == (
        SentinelTarget((("s1", 26380), ("s2", 26379), ("::1", 5000)), "mymaster", 2))
    target = parse_sentinel_url(
        "rediss+sentinel://npuserve-worker@s1:1/m?ssl_ca_certs=/ca.pem&ssl_check_hostname=false")
    assert (target.username, target.password, target.db, target.tls) == (
        "npuserve-worker", None, 0, True)
    assert target.options == {"ssl_ca_certs": "/ca.pem", "ssl_check_hostname": False}
    assert parse_sentinel_url("redis+sentinel://u:p%40ss@s1/m?db=3").password == "p@ss"
    assert parse_sentinel_url("redis+sentinel://u:p%40ss@s1/m?db=3").db == 3


@pytest.mark.parametrize(("url", "why"), [
    ("redis+sentinel://s1:1", "/SERVICE"),
    ("redis+sentinel://s1:1/m/0/x", "/SERVICE"),
    ("redis+sentinel:///m", "no sentinel address"),
    ("redis+sentinel://s1:port/m", "bad port"),
    ("redis+sentinel://s1:70000/m", "bad port"),
    ("redis+sentinel://s1/m/zero", "database"),
    ("redis+sentinel://u:secret@s1/m?socket_timeout=soon", "socket_timeout"),
])
def test_a_bad_sentinel_url_is_refused_naming_the_fault_not_the_password(url: str,
                                                                           why: str) -> None:
    with pytest.raises(InvalidRequestError, match=why) as info:
        parse_sentinel_url(url)
    assert "secret" not in str(info.value)


def test_each_form_builds_its_kind_of_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPUSERVE_REDIS_SENTINEL_PASSWORD", "sentinel-secret")
    plain = connect_sync("rediss://h:6380/1?ssl_ca_certs=/ca.pem", password="pw")
    kwargs = plain.connection_pool.connection_kwargs
    assert plain.connection_pool.connection_class is redis.SSLConnection
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"],
            kwargs["ssl_ca_certs"]) == ("h", 6380, 1, "pw", "/ca.pem")
    socket = connect_sync("unix:///tmp/redis.sock?db=2")
    assert socket.connection_pool.connection_kwargs["path"] == "/tmp/redis.sock"

    master = connect_sync("rediss+sentinel://npuserve-worker@s1:1,s2:2/m/4?ssl_ca_certs=/ca.pem",
                          password="pw", socket_timeout=5.0)
    pool = master.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert pool.connection_class is redis.sentinel.SentinelManagedSSLConnection
    assert (pool.service_name, pool.connection_kwargs["db"], pool.connection_kwargs["username"],
            pool.connection_kwargs["password"]) == ("m", 4, "npuserve-worker", "pw")
    manager = pool.sentinel_manager
    sentinel = manager.sentinels[0].connection_pool.connection_kwargs
    assert [s.connection_pool.connection_kwargs["port"] for s in manager.sentinels] == [1, 2]
    assert (sentinel["password"], sentinel["socket_timeout"], sentinel["ssl_ca_certs"]) == (
        "sentinel-secret", 1.0, "/ca.pem")
    for client in (plain, socket, master):
        client.close()

    async def build() -> None:
        client = connect_async("redis+sentinel://s1:1/m", decode_responses=True)
        assert isinstance(client, aioredis.Redis)
        assert isinstance(client.connection_pool, aiosentinel.SentinelConnectionPool)
        assert client.connection_pool.service_name == "m"
        await client.aclose()

    asyncio.run(build())


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://u:pw@h:1/0", "redis://u:***@h:1/0"),
    ("redis://:pw@h", "redis://:***@h"),
    ("redis://h:1/0", "redis://h:1/0"),
    ("rediss://npuserve-gateway:pw@h:6380/0?ssl_ca_certs=/etc/ca.pem",
     "rediss://npuserve-gateway:***@h:6380/0?ssl_ca_certs=/etc/ca.pem"),
    ("rediss://h:6380/0?ssl_ca_certs=/certs/ca@2.pem",
     "rediss://h:6380/0?ssl_ca_certs=/certs/ca@2.pem"),
    ("unix://:pw@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
    ("redis+sentinel://u:pw@s1:26379,s2:26379,s3/npuserve/0",
     "redis+sentinel://u:***@s1:26379,s2:26379,s3/npuserve/0"),
    ("redis+sentinel://s1:26379,s2:26379/npuserve", "redis+sentinel://s1:26379,s2:26379/npuserve"),
    ("redis://h/0?password=pw&db=1", "redis://h/0?password=***&db=1"),
    ("redis://u:p/w@h:1/0", "redis://u:***@h:1/0"),  # characters that should have been escaped
    ("redis://u:p#w@h", "redis://u:***@h"),
    ("redis://u:p@w@h:1", "redis://u:***@h:1"),
    ("not a url", "not a url"),
    ("", ""),
])
def test_urls_are_redacted_in_every_form(url: str, shown: str) -> None:
    assert redact(url) == shown
