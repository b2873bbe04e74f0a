"""Gateway test factories: a real gateway on a free loopback port against the session's real
Redis, a gRPC stub for it, and a stand-in worker that publishes model info, registers, takes
requests off the queue and writes reply events exactly as a worker does."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis

from common.config import GatewayConfig, RedisConfig
from common.keys import Keys
from common.protocol import QueuedRequest, ReplyEvent, encode_events
from gateway.redis_queue import connect
from gateway.server import Gateway
from preprocess.tokenizer import TOKENIZER_FILES
from protos import npuserve_pb2_grpc

MODEL = "tiny-qwen3"
MAX_LEN = 64
"""The context the stand-in worker publishes: small, so prompts can overflow it cheaply."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client of the session's Redis, as the gateway connects."""
    client = connect(redis_url)
    yield client
    await client.aclose()


def model_info(model_dir: Path) -> dict[str, str]:
    """model:{name} as a worker publishes it (worker.model_info.model_info, without an engine)."""
    digest = hashlib.sha256()
    info: dict[str, str] = {}
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            info[f"file:{name}"] = text
            digest.update(f"{name}\0{len(text)}\0".encode() + text.encode())
    config = json.loads((model_dir / "config.json").read_text())
    info.update(vocab_size=str(config["vocab_size"]),
                eos_token_ids=json.dumps([config["eos_token_id"]]), sha=digest.hexdigest())
    return info


class FakeWorker:
    """Publishes and registers like a worker; `take` claims a request, `send` replies."""

    def __init__(self, r: aioredis.Redis, keys: Keys, worker_id: str = "w1") -> None:
        self.r = r
        self.keys = keys
        self.worker_id = worker_id

    async def publish(self, model_dir: Path, model: str = MODEL) -> None:
        await self.r.hset(self.keys.model(model), mapping=model_info(model_dir))

    async def register(self, model: str = MODEL, ttl_s: int = 30, capacity: int = 4,
                       max_len: int = MAX_LEN) -> None:
        key = self.keys.worker(self.worker_id)
        await self.r.hset(key, mapping={"model": model, "backend": "torch", "device": "cpu",
                                        "capacity": capacity, "running": 0, "max_len": max_len})
        await self.r.expire(key, ttl_s)
        await self.r.zadd(self.keys.workers(), {self.worker_id: time.time_ns() // 10**6})

    async def take(self, model: str = MODEL, timeout_s: float = 30.0) -> QueuedRequest:
        """Pop the best queued request as CLAIM does (without a lease)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            popped = await self.r.zpopmax(self.keys.queue(model))
            if popped:
                fields = await self.r.hgetall(self.keys.request(model, popped[0][0]))
                return QueuedRequest.from_fields(fields)
            await asyncio.sleep(0.02)
        raise AssertionError(f"nothing was queued for {model}")

    async def send(self, gateway_id: str, *events: ReplyEvent) -> None:
        """One stream entry, as one engine step writes it."""
        await self.r.xadd(self.keys.replies(gateway_id), {"e": encode_events(list(events))})


@dataclass
class Stack:
    gateway: Gateway
    stub: npuserve_pb2_grpc.GenerationStub
    channel: grpc.aio.Channel
    r: aioredis.Redis
    keys: Keys
    worker: FakeWorker

    @property
    def gateway_id(self) -> str:
        return self.gateway.gateway_id

    async def queued(self, model: str = MODEL) -> int:
        return int(await self.r.zcard(self.keys.queue(model)))


StackFactory = Callable[..., AbstractAsyncContextManager[Stack]]


@pytest.fixture
def gateway_stack(redis_url: str, tiny_qwen3: Path) -> StackFactory:
    """`async with gateway_stack(serve=True, **config) as stack:` a running gateway.

    serve=True publishes the tiny Qwen3 model and registers a live worker for it first.
    Config overrides are GatewayConfig fields; `redis_url=` points the gateway elsewhere.
    """

    @asynccontextmanager
    async def start(serve: bool = True, redis: str | None = None,
                    **overrides: Any) -> AsyncIterator[Stack]:
        keys = Keys()
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        worker = FakeWorker(r, keys)
        if serve:
            await worker.publish(tiny_qwen3)
            await worker.register()
        config = dataclasses.replace(
            GatewayConfig(redis=RedisConfig(url=redis or redis_url), listen="127.0.0.1:0"),
            **overrides)
        gateway = Gateway(config, health_interval_s=0.1, relay_block_ms=200)
        port = await gateway.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield Stack(gateway, npuserve_pb2_grpc.GenerationStub(channel), channel, r, keys,
                        worker)
        finally:
            await channel.close()
            await gateway.stop(grace_s=1.0)
            await r.aclose()

    return start
