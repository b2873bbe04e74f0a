"""The gateway reports a Redis that refuses its password as such to its clients, naming what
to set, not as an unreachable Redis."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from protos import npuserve_pb2 as pb
from tests.gateway.conftest import StackFactory


@pytest.mark.anyio
async def test_a_refused_password_is_reported_as_such_by_the_gateway(
        gateway_stack: StackFactory, user_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPUSERVE_REDIS_PASSWORD", "wrong")
    async with gateway_stack(redis=user_url) as s:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "refused npuserve's credentials" in (info.value.details() or "")
