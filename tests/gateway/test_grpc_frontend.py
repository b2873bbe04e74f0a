"""The gRPC front end over a core: transport credentials are pluggable (TLS here)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.config import GatewayConfig, RedisConfig
from gateway.server import Gateway
from protos import npuserve_pb2 as pb
from protos import npuserve_pb2_grpc

pytestmark = pytest.mark.anyio


def self_signed(tmp_path: Path) -> tuple[bytes, bytes]:
    """A key and certificate for localhost, made by openssl."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key.read_bytes(), cert.read_bytes()


async def test_with_server_credentials_the_gateway_serves_tls_and_refuses_plaintext(
        redis_url: str, tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path)
    config = GatewayConfig(redis=RedisConfig(url=redis_url), listen="localhost:0")
    gateway = Gateway(config, credentials=grpc.ssl_server_credentials([(key, cert)]))
    port = await gateway.start()
    try:
        secure = grpc.aio.secure_channel(f"localhost:{port}",
                                         grpc.ssl_channel_credentials(root_certificates=cert))
        listing = await npuserve_pb2_grpc.GenerationStub(secure).ListModels(
            pb.ListModelsRequest(), timeout=10)
        assert list(listing.models) == []
        await secure.close()
        plain = grpc.aio.insecure_channel(f"localhost:{port}")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await npuserve_pb2_grpc.GenerationStub(plain).ListModels(
                pb.ListModelsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await plain.close()
    finally:
        await gateway.stop(grace_s=1.0)
