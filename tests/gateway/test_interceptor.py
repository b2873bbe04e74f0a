"""Exceptions to statuses: user errors keep their message, bugs become INTERNAL with the
request id and a logged traceback."""

from __future__ import annotations

import logging

import grpc
import pytest

from common.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    ErrorCode,
    InvalidRequestError,
    ModelConfigError,
    ModelNotFoundError,
    RemoteError,
    ResourceExhaustedError,
    UnavailableError,
)
from gateway.context import REQUEST_ID
from gateway.interceptor import status_for
from gateway.service import GatewayService
from protos import npuserve_pb2 as pb
from tests.gateway.conftest import StackFactory


@pytest.mark.parametrize(("error", "code"), [
    (InvalidRequestError("top_p", "must be in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError("model 'x' is not served"), grpc.StatusCode.NOT_FOUND),
    (ResourceExhaustedError("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AlreadyExistsError("dup"), grpc.StatusCode.ALREADY_EXISTS),
    (UnavailableError("no redis"), grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceededError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (RemoteError(ErrorCode.INTERNAL, "worker said no"), grpc.StatusCode.INTERNAL),
    (RemoteError(ErrorCode.INVALID_ARGUMENT, "prompt: too long"),
     grpc.StatusCode.INVALID_ARGUMENT),
    (ModelConfigError("no tokenizer"), grpc.StatusCode.FAILED_PRECONDITION),
])
def test_npuserve_errors_map_to_their_status_with_their_message(
        error: Exception, code: grpc.StatusCode) -> None:
    assert status_for(error, "/m") == (code, str(error))


@pytest.mark.anyio
async def test_an_unexpected_exception_is_internal_with_the_request_id_and_logged(
        gateway_stack: StackFactory, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    async def broken(self: GatewayService, request_id: str) -> bool:
        seen.append(REQUEST_ID.get())
        raise RuntimeError("secret internals")

    monkeypatch.setattr(GatewayService, "cancel", broken)
    async with gateway_stack(serve=False) as s:
        with (caplog.at_level(logging.ERROR, logger="gateway.failures"),
              pytest.raises(grpc.aio.AioRpcError) as info):
            await s.stub.Cancel(pb.CancelRequest(request_id="abc"))
        ok = await s.stub.ListModels(pb.ListModelsRequest())
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details() or ""
    assert seen[0] in details and "secret" not in details
    assert any(seen[0] in r.getMessage() and r.exc_info for r in caplog.records)
    assert list(ok.models) == []
