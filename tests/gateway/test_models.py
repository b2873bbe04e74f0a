"""The model registry: live workers decide what is served; tokenizers come from model info."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common.errors import InvalidRequestError, ModelNotFoundError, UnavailableError
from common.keys import Keys
from gateway.models import ModelRegistry
from tests.gateway.conftest import MAX_LEN, MODEL, FakeWorker, model_info

pytestmark = pytest.mark.anyio
KEYS = Keys()


async def test_nothing_is_served_without_a_live_worker(r: aioredis.Redis, redis_url: str,
                                                       tiny_qwen3: Path) -> None:
    registry = ModelRegistry(r, KEYS, redis_url)
    with pytest.raises(UnavailableError, match="no live worker serves any model"):
        await registry.resolve("")
    worker = FakeWorker(r, KEYS)
    await worker.publish(tiny_qwen3)
    await worker.register()
    await r.delete(KEYS.worker("w1"))  # the registration expired; the ZSET entry stays
    with pytest.raises(UnavailableError):
        await registry.resolve(MODEL, tokenizer=False)


async def test_resolve_finds_a_new_worker_at_once_and_names_the_served_models_otherwise(
        r: aioredis.Redis, redis_url: str, tiny_qwen3: Path) -> None:
    registry = ModelRegistry(r, KEYS, redis_url, max_age_s=60)
    await registry.refresh()
    await asyncio.sleep(0.15)  # a miss re-reads a snapshot older than 0.1 s
    worker = FakeWorker(r, KEYS)
    await worker.publish(tiny_qwen3)
    await worker.register()
    model = await registry.resolve("", tokenizer=False)
    assert (model.meta.name, model.meta.max_len, model.meta.vocab_size) == (MODEL, MAX_LEN,
                                                                          151936)
    assert [w.id for w in model.workers] == ["w1"]
    with pytest.raises(ModelNotFoundError,
                       match=f"model 'other' is not served; served models: {MODEL}"):
        await registry.resolve("other")
    second = FakeWorker(r, KEYS, "w2")
    await second.register(model="other")
    await asyncio.sleep(0.15)
    with pytest.raises(UnavailableError, match="'other' has live workers but no published"):
        await registry.resolve("other")
    with pytest.raises(InvalidRequestError, match=f"model: is required: .*other, {MODEL}"):
        await registry.resolve("")


async def test_tokenizers_are_built_from_model_info_and_cached_by_sha(
        r: aioredis.Redis, redis_url: str, tiny_qwen3: Path) -> None:
    worker = FakeWorker(r, KEYS)
    await worker.publish(tiny_qwen3)
    await worker.register()
    first = await ModelRegistry(r, KEYS, redis_url).resolve(MODEL)
    assert first.tokenizer.encode("Hello world") == [9707, 1879]
    again = await ModelRegistry(r, KEYS, redis_url).resolve(MODEL)
    assert again.tokenizer is first.tokenizer
    info = model_info(tiny_qwen3)
    await r.hset(KEYS.model(MODEL), mapping={"sha": "changed",
                                             "file:tokenizer.json": info["file:tokenizer.json"]})
    changed = await ModelRegistry(r, KEYS, redis_url).resolve(MODEL)
    assert changed.meta.sha == "changed" and changed.tokenizer is not first.tokenizer


async def test_a_models_context_is_the_longest_of_its_live_workers(
        r: aioredis.Redis, redis_url: str, tiny_qwen3: Path) -> None:
    small, large = FakeWorker(r, KEYS, "bm-0"), FakeWorker(r, KEYS, "cpu-0")
    await small.publish(tiny_qwen3)
    await small.register(max_len=512)
    await large.register(max_len=8192)
    registry = ModelRegistry(r, KEYS, redis_url)
    assert (await registry.resolve(MODEL, tokenizer=False)).meta.max_len == 8192
    await r.delete(KEYS.worker("cpu-0"))
    await registry.refresh()
    assert (await registry.resolve(MODEL, tokenizer=False)).meta.max_len == 512
