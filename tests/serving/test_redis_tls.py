"""Redis over TLS: a redis-server that speaks only TLS and wants a client certificate (made
by deploy/tls/self-signed.sh), and a gateway and a worker whose `rediss://` URL names the CA
and their certificate in its query string: both connect, and a generation runs through it.
Without the CA, or in plain text, the connection is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.client import GenerationClient, collect
from protos import npuserve_pb2 as pb
from tests.redis_servers import RedisProcess, self_signed, start_redis
from tests.serving.conftest import one_of_each

pytestmark = pytest.mark.timeout(240)
MODEL = "tls"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisProcess, str]]:
    """The TLS-only server and the URL of a client that trusts its CA and holds a client
    certificate."""
    certs = self_signed(tmp_path_factory.mktemp("redis-tls"))
    server = start_redis("redis-tls", tmp_path_factory.mktemp("redis"), tls=certs)
    url = (f"rediss://localhost:{server.port}/0?ssl_ca_certs={certs / 'ca.pem'}"
           f"&ssl_certfile={certs / 'client.pem'}&ssl_keyfile={certs / 'client.key'}")
    try:
        yield server, url
    finally:
        server.stop()


def test_a_gateway_and_a_worker_serve_over_rediss(tls_redis: tuple[RedisProcess, str],
                                                  tiny_qwen3: Path,
                                                  tmp_path: Path) -> None:
    server, url = tls_redis
    with one_of_each(url, tiny_qwen3, MODEL, tmp_path) as fl:
        with GenerationClient(fl.gateway, timeout=60) as client:
            result = collect(client.generate([11, 12, 13], model=MODEL, max_tokens=8,
                                             sampling=pb.SamplingParameters(temperature=0)))
        assert len(result.token_ids) == 8 and result.finish_reason == "length"
        with redis.Redis.from_url(url, decode_responses=True) as r:
            assert r.exists(f"{fl.prefix}workers")  # the worker registered over TLS
            clients = r.client_list()
        assert len(clients) >= 3  # this one, the gateway's and the worker's


def test_without_the_ca_or_in_plain_text_redis_refuses(
        tls_redis: tuple[RedisProcess, str]) -> None:
    server, url = tls_redis
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis.from_url(f"rediss://localhost:{server.port}/0").ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(f"redis://localhost:{server.port}/0", socket_timeout=2).ping()
    no_cert = url.split("&ssl_certfile")[0]
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(no_cert, socket_timeout=2).ping()
