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

    async def broken(self: GatewayService, request_id: str, tenant: str = "",
                     **_: object) -> bool:
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


@pytest.mark.anyio
async def test_undecodable_requests_get_invalid_argument_and_one_log_line(
        gateway_stack: StackFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Bytes that are not the method's message, and a string field that is not UTF-8, are
    the client's fault: INVALID_ARGUMENT with a plain message, no traceback, one log line for
    the lot; the gateway then serves well-formed requests as before."""
    garbage = [b"\xff\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x12\x03a\xc3(", b"\x0a"]
    async with gateway_stack() as s:
        with caplog.at_level(logging.INFO):
            for method, stream in (("Generate", True), ("Tokenize", False), ("Cancel", False)):
                path = f"/npuserve.v1.Generation/{method}"
                call = (s.channel.unary_stream(path) if stream
                        else s.channel.unary_unary(path))
                for raw in garbage:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        if stream:
                            async for _ in call(raw):
                                pass
                        else:
                            await call(raw)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raw
                    if method == "Generate":  # some of the bytes parse as other messages
                        assert "not a valid Generate" in (info.value.details() or "")
        ok = await s.stub.ListModels(pb.ListModelsRequest())
    assert len(ok.models) == 1
    reports = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(reports) == 1 and not any(r.exc_info for r in caplog.records)
