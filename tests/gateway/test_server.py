"""Server wiring: grpc.health.v1 follows live workers, reflection lists the service, and a
gateway without Redis answers UNAVAILABLE quickly instead of hanging."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import grpc.aio
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.keys import GATEWAY_TTL_S, REPLIES_TTL_S
from protos import npuserve_pb2 as pb
from tests.gateway.conftest import MODEL, StackFactory

pytestmark = pytest.mark.anyio
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def wait_for_health(channel: grpc.aio.Channel, status: int, service: str = "") -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 5
    while True:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        if reply.status == status:
            return
        assert time.monotonic() < deadline, f"health stayed {reply.status}, wanted {status}"
        await asyncio.sleep(0.05)


async def test_health_is_serving_only_while_a_live_worker_serves_a_model(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack(serve=False) as s:
        await wait_for_health(s.channel, NOT_SERVING)
        await s.worker.register()
        await wait_for_health(s.channel, SERVING)
        await wait_for_health(s.channel, SERVING, "npuserve.v1.Generation")
        await s.r.delete(s.keys.worker("w1"))  # what an expired registration looks like
        await wait_for_health(s.channel, NOT_SERVING)


async def test_a_draining_worker_does_not_count_and_each_model_has_its_own_health(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack(serve=False) as s:
        await s.worker.register()
        await wait_for_health(s.channel, SERVING)
        await wait_for_health(s.channel, SERVING, MODEL)
        await s.r.hset(s.keys.worker("w1"), "draining", "1")
        await wait_for_health(s.channel, NOT_SERVING)
        await wait_for_health(s.channel, NOT_SERVING, MODEL)
        reply = await health_pb2_grpc.HealthStub(s.channel).List(health_pb2.HealthListRequest())
        assert {name: st.status for name, st in reply.statuses.items()} == {
            "": NOT_SERVING, "npuserve.v1.Generation": NOT_SERVING, MODEL: NOT_SERVING}
        await s.r.hset(s.keys.worker("w1"), "draining", "0")
        await wait_for_health(s.channel, SERVING, MODEL)


async def test_shutdown_reports_not_serving_before_streams_end(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack() as s:
        await wait_for_health(s.channel, SERVING)
        await s.gateway.core.begin_shutdown()
        await wait_for_health(s.channel, NOT_SERVING)
        await wait_for_health(s.channel, NOT_SERVING, MODEL)


async def test_reflection_lists_the_generation_and_health_services(
        gateway_stack: StackFactory) -> None:
    async with gateway_stack(serve=False) as s:
        stub = reflection_pb2_grpc.ServerReflectionStub(s.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {svc.name for svc in reply.list_services_response.service}
            break
    assert {"npuserve.v1.Generation", "grpc.health.v1.Health"} <= names


async def test_reflection_can_be_turned_off(gateway_stack: StackFactory) -> None:
    async with gateway_stack(serve=False, reflection=False) as s:
        stub = reflection_pb2_grpc.ServerReflectionStub(s.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.ServerReflectionInfo(iter([request])):
                pass
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_without_redis_rpcs_fail_fast_with_unavailable_naming_the_url(
        gateway_stack: StackFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"redis://:hunter2@127.0.0.1:{sock.getsockname()[1]}/0"
    async with gateway_stack(serve=False, redis=closed) as s:
        for call in (s.stub.Generate(pb.GenerateRequest(model=MODEL, text="hi")),
                     s.stub.ListModels(pb.ListModelsRequest()),
                     s.stub.Cancel(pb.CancelRequest(request_id="x"))):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                if isinstance(call, grpc.aio.UnaryStreamCall):
                    async for _ in call:
                        pass
                else:
                    await call
            assert time.monotonic() - started < 2.5
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            details = info.value.details() or ""
            assert f"127.0.0.1:{closed.rsplit(':', 1)[1]}" in details and "unreachable" in details
            assert "hunter2" not in details
        await wait_for_health(s.channel, NOT_SERVING)


async def test_a_gateway_registers_keeps_its_stream_alive_and_unregisters(
        gateway_stack: StackFactory, redis_url: str) -> None:
    """Workers serve a gateway's requests while its registration lives (GATEWAY_TTL_S after
    its last heartbeat); its reply stream expires REPLIES_TTL_S after it."""
    async with gateway_stack(serve=False) as s:
        key = s.keys.gateway(s.gateway_id)
        assert await s.r.hget(key, "pid") is not None
        await s.r.xadd(s.keys.replies(s.gateway_id), {"e": "[]"})
        await asyncio.sleep(0.3)  # a few heartbeats at the tests' 0.1 s interval
        assert 0 < await s.r.ttl(key) <= GATEWAY_TTL_S
        assert 0 < await s.r.ttl(s.keys.replies(s.gateway_id)) <= REPLIES_TTL_S
    with redis.Redis.from_url(redis_url) as r:
        assert not r.exists(key, s.keys.replies(s.gateway_id))
