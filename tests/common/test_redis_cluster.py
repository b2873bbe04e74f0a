"""Cluster URLs: startup nodes, credentials and TLS options parsed, mistakes named, and the
password never shown."""

from __future__ import annotations

import pytest

from common.errors import InvalidRequestError
from common.redis_cluster import is_cluster, parse_cluster_url
from common.redis_credentials import redact


def test_nodes_user_password_and_tls_options() -> None:
    nodes, options = parse_cluster_url(
        "rediss+cluster://npuserve:pw@10.0.0.1:7000,10.0.0.2?ssl_ca_certs=/ca.pem")
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 6379)]
    assert options == {"username": "npuserve", "password": "pw", "ssl_ca_certs": "/ca.pem",
                       "ssl": True}
    assert parse_cluster_url("redis+cluster://h:1/") == ([("h", 1)], {})
    assert is_cluster("REDIS+CLUSTER://h:1") and not is_cluster("redis://h:1")


@pytest.mark.parametrize(("url", "message"), [
    ("redis+cluster://", "no node address"),
    ("redis+cluster://h:x", "bad port"),
    ("redis+cluster://h:70000", "has a bad port"),
    ("redis+cluster://h:1/2", "only database 0"),
    ("redis://h:1", "not a cluster URL"),
])
def test_mistakes_are_named_without_the_password(url: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_cluster_url(url)


def test_the_password_is_redacted() -> None:
    assert redact("redis+cluster://u:secret@h:1,h:2") == "redis+cluster://u:***@h:1,h:2"


def test_an_unreachable_cluster_is_unavailable_naming_it() -> None:
    from common.errors import UnavailableError
    from common.redis_cluster import cluster_sync
    from worker.processes import free_port

    with pytest.raises(UnavailableError, match=r"Redis Cluster at redis\+cluster://u:\*\*\*@"):
        cluster_sync(f"redis+cluster://u:pw@127.0.0.1:{free_port()}",
                     socket_connect_timeout=0.5)
