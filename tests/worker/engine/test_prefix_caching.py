"""Prefix caching end to end on the tiny random Qwen3: the same greedy tokens as without it,
and only the tokens past the cached prefix computed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from common.config import EngineConfig
from common.sampling_params import SamplingParams
from worker.backends.base import SequenceChunk, StepResult
from worker.backends.torch_settings import TorchSettings
from worker.engine.engine import Engine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PREFIX = [(7 * i) % 900 + 100 for i in range(130)]
"""A shared system prompt of 130 tokens: 8 full blocks of 16 and 2 tokens."""


def own(i: int, n: int = 11) -> list[int]:
    return [1000 + 37 * i + j for j in range(n)]


def engine(model: Path, caching: bool, kv_cache_gb: float = 0.05, **config: int) -> Engine:
    return Engine.from_model_dir(
        model, EngineConfig(enable_prefix_caching=caching, **config),  # type: ignore[arg-type]
        settings=TorchSettings(kv_cache_gb=kv_cache_gb))


class Fed:
    """Counts the tokens the backend is given to compute."""

    def __init__(self, e: Engine) -> None:
        self.tokens = 0
        execute = e.backend.execute

        def counted(chunks: Sequence[SequenceChunk]) -> StepResult:
            self.tokens += sum(len(c.token_ids) for c in chunks)
            return execute(chunks)

        e.backend.execute = counted  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def uncached(tiny_qwen3: Path) -> Engine:
    return engine(tiny_qwen3, caching=False)


@pytest.fixture(scope="module")
def cached(tiny_qwen3: Path) -> Engine:
    return engine(tiny_qwen3, caching=True)


def one_by_one(e: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY
               ) -> list[list[int]]:
    return [e.generate([p], params)[0].token_ids for p in prompts]


def test_caching_is_on_by_default_and_off_when_asked(uncached: Engine, cached: Engine,
                                                     tiny_qwen3: Path) -> None:
    assert cached.prefix_caching and not uncached.prefix_caching
    assert EngineConfig().enable_prefix_caching


def test_requests_sharing_a_long_prefix_get_the_tokens_they_get_without_caching(
    uncached: Engine, cached: Engine
) -> None:
    prompts = [PREFIX + own(i) for i in range(4)]
    expected = one_by_one(uncached, prompts)
    before = cached.prefix_cache_stats.cached_tokens
    assert one_by_one(cached, prompts) == expected
    assert cached.prefix_cache_stats.cached_tokens - before >= 3 * 128
    assert [c.token_ids for c in cached.generate(prompts, GREEDY)] == expected  # batched


def test_the_second_request_computes_only_its_own_tokens(tiny_qwen3: Path) -> None:
    e = engine(tiny_qwen3, caching=True)
    fed = Fed(e)
    first, second = PREFIX + own(0), PREFIX + own(1)
    e.generate([first], GREEDY)
    assert fed.tokens == len(first) + GREEDY.max_tokens - 1
    stats = e.prefix_cache_stats
    assert (stats.prompt_tokens, stats.cached_tokens) == (len(first), 0)
    fed.tokens = 0
    e.generate([second], GREEDY)
    assert fed.tokens == len(second) - 128 + GREEDY.max_tokens - 1
    assert (stats.prompt_tokens, stats.cached_tokens) == (len(first) + len(second), 128)


def test_a_second_chat_turn_reuses_the_first_turns_prompt_and_answer(
    uncached: Engine, cached: Engine
) -> None:
    turn1 = PREFIX + own(9)
    [answer] = cached.generate([turn1], GREEDY)
    turn2 = turn1 + answer.token_ids + own(10, 5)
    before = cached.prefix_cache_stats.cached_tokens
    [reply] = cached.generate([turn2], GREEDY)
    # every block the first turn filled, decoded tokens included (its last one was never fed)
    computed = len(turn1) + len(answer.token_ids) - 1
    assert cached.prefix_cache_stats.cached_tokens - before == computed // 16 * 16
    assert reply.token_ids == uncached.generate([turn2], GREEDY)[0].token_ids


@pytest.mark.parametrize("budget", [16, 40])
def test_chunked_prefill_after_a_cached_prefix_gives_the_same_tokens(
    tiny_qwen3: Path, uncached: Engine, budget: int
) -> None:
    prompts = [PREFIX + own(i, 60) for i in range(3)]
    expected = one_by_one(uncached, prompts)
    e = engine(tiny_qwen3, caching=True, max_num_batched_tokens=budget)
    assert one_by_one(e, prompts) == expected
    assert e.prefix_cache_stats.cached_tokens == 2 * 128
    e2 = engine(tiny_qwen3, caching=True, max_num_batched_tokens=budget)
    assert [c.token_ids for c in e2.generate(prompts, GREEDY)] == expected


def test_preemption_under_a_tiny_cache_gives_the_same_tokens(
    tiny_qwen3: Path, uncached: Engine
) -> None:
    prompts = [PREFIX[:40] + own(i, 10) for i in range(4)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    expected = [c.token_ids for c in uncached.generate(prompts, params)]
    per_block = uncached.backend.kv_cache_bytes() // uncached.backend.capacity.num_blocks
    # 16 blocks of 16: four requests of 90 tokens need 24 (fewer when they share blocks)
    tight = engine(tiny_qwen3, caching=True, kv_cache_gb=16 * per_block / 2**30)
    assert tight.backend.capacity.num_blocks == 16
    ids = [tight.add_request(p, params) for p in prompts]
    requests = [tight.scheduler.get(rid) for rid in ids]
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    for events in tight.steps():
        for ev in events:
            got[ev.request_id].append(ev.token_id)
    assert [got[rid] for rid in ids] == expected
    assert sum(r.num_preemptions for r in requests if r is not None) > 0
    assert tight.prefix_cache_stats.cached_tokens > 0
    assert tight.scheduler.blocks.num_free_blocks == 16


@pytest.mark.parametrize("cut", [1, 20])
def test_a_resumed_request_hits_the_cache_and_continues_exactly(
    cached: Engine, uncached: Engine, cut: int
) -> None:
    prompt = PREFIX + own(20)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    [whole] = uncached.generate([prompt], params)
    [again] = cached.generate([prompt], params)  # its prompt and outputs are cached now
    assert again.token_ids == whole.token_ids
    before = cached.prefix_cache_stats.cached_tokens
    rid = cached.add_request(prompt, params, output_ids=whole.token_ids[:cut])
    events = [ev for step in cached.steps() for ev in step if ev.request_id == rid]
    assert [ev.token_id for ev in events] == whole.token_ids[cut:]
    resumed = len(prompt) + cut
    assert cached.prefix_cache_stats.cached_tokens - before == (resumed - 1) // 16 * 16
