"""TLS and mutual TLS on the gateway's gRPC port, with the material deploy/tls/self-signed.sh
makes (the README's example): a TLS client is served, a plaintext one is not; with a client
CA, a client without a certificate that CA signed is refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.errors import InvalidRequestError
from gateway.tls import channel_credentials, server_credentials
from protos import npuserve_pb2 as pb
from protos import npuserve_pb2_grpc
from tests.gateway.conftest import StackFactory

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "tls" / "self-signed.sh"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls")
    subprocess.run(["bash", str(SCRIPT), str(out)], check=True, capture_output=True)
    return out


async def list_models(port: int, credentials: grpc.ChannelCredentials | None) -> int:
    target = f"localhost:{port}"
    channel = (grpc.aio.insecure_channel(target) if credentials is None
               else grpc.aio.secure_channel(target, credentials))
    async with channel:
        stub = npuserve_pb2_grpc.GenerationStub(channel)
        reply = await stub.ListModels(pb.ListModelsRequest(), timeout=5)
        return len(reply.models)


@pytest.mark.anyio
async def test_tls_serves_tls_clients_only(gateway_stack: StackFactory, certs: Path) -> None:
    async with gateway_stack(tls_cert=str(certs / "server.pem"),
                             tls_key=str(certs / "server.key")) as s:
        port = s.gateway.port
        assert await list_models(port, channel_credentials(str(certs / "ca.pem"))) == 1
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await list_models(port, None)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.anyio
async def test_mutual_tls_refuses_clients_without_a_signed_certificate(
        gateway_stack: StackFactory, certs: Path) -> None:
    async with gateway_stack(tls_cert=str(certs / "server.pem"),
                             tls_key=str(certs / "server.key"),
                             tls_client_ca=str(certs / "ca.pem")) as s:
        port = s.gateway.port
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await list_models(port, channel_credentials(str(certs / "ca.pem")))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        signed = channel_credentials(str(certs / "ca.pem"), str(certs / "client.pem"),
                                     str(certs / "client.key"))
        assert await list_models(port, signed) == 1


def test_incomplete_or_unreadable_tls_settings_are_refused(certs: Path) -> None:
    with pytest.raises(InvalidRequestError, match="both --tls-cert and --tls-key"):
        server_credentials(str(certs / "server.pem"), "")
    with pytest.raises(InvalidRequestError, match="needs --tls-cert"):
        server_credentials("", "", str(certs / "ca.pem"))
    with pytest.raises(InvalidRequestError, match="tls_key: cannot read /nonexistent"):
        server_credentials(str(certs / "server.pem"), "/nonexistent")
