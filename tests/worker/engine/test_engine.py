"""The engine end to end on real checkpoints: parity with transformers, batching, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.capabilities import Capabilities
from common.config import LATENCY_PREFILL_STALL, EngineConfig
from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams
from worker.backends.torch_settings import TorchSettings
from worker.engine.engine import Engine
from worker.engine.request import FinishReason

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "List three primary colors.",
    "你好，介绍一下你自己",
    "Explain gravity to a five year old.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "Give me a haiku about the sea.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def smol_engine(smollm2_dir: Path) -> Engine:
    return Engine.from_model_dir(smollm2_dir, EngineConfig(max_num_seqs=16,
                                                           max_num_batched_tokens=256),
                                 settings=TorchSettings(kv_cache_gb=0.5))


@pytest.fixture(scope="module")
def chat_prompts(smollm2_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False) for p in PROMPTS]


@pytest.fixture(scope="module")
def tiny_engine(tiny_qwen3: Path) -> Engine:
    return Engine.from_model_dir(tiny_qwen3, EngineConfig(max_num_seqs=8),
                                 settings=TorchSettings(kv_cache_gb=0.05))


def test_greedy_output_equals_transformers_generate_token_for_token(
    smollm2_dir: Path, smol_engine: Engine, chat_prompts: list[list[int]]
) -> None:
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ours = smol_engine.generate(chat_prompts, GREEDY)
    for prompt, completion in zip(chat_prompts, ours, strict=True):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens,
                               do_sample=False)
        expected = out[0, len(prompt):].tolist()
        assert completion.token_ids == expected[: len(completion.token_ids)]
        assert len(completion.token_ids) == len(expected)


def test_a_batched_run_gives_each_prompt_the_tokens_it_gets_alone(
    smol_engine: Engine, chat_prompts: list[list[int]]
) -> None:
    batched = smol_engine.generate(chat_prompts, GREEDY)
    for prompt, together in zip(chat_prompts, batched, strict=True):
        [alone] = smol_engine.generate([prompt], GREEDY)
        assert together.token_ids == alone.token_ids


def test_requests_with_different_sampling_settings_each_keep_their_own(
    tiny_engine: Engine
) -> None:
    prompt = list(range(300, 320))
    settings = [
        SamplingParams(max_tokens=12, temperature=0.0),
        SamplingParams(max_tokens=12, temperature=1.0, seed=7),
        SamplingParams(max_tokens=12, temperature=0.8, top_k=5, seed=8),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.5, seed=9),
        SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.5),
        SamplingParams(max_tokens=5, temperature=1.0, min_p=0.2, seed=10, logprobs=True),
    ]
    together = tiny_engine.generate([prompt] * len(settings), settings)
    alone = [tiny_engine.generate([prompt], [sp])[0] for sp in settings]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in together}) >= 4  # the settings really differ
    assert len(together[5].token_ids) == 5 and together[5].logprobs is not None
    assert len(together[5].logprobs) == 5 and all(lp <= 0 for lp in together[5].logprobs)
    assert together[0].logprobs is None


def test_same_seed_and_prompt_give_the_same_output_whatever_the_batch(tiny_engine: Engine) -> None:
    prompt = list(range(500, 510))
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    [alone] = tiny_engine.generate([prompt], seeded)
    others = [list(range(600, 600 + n)) for n in (3, 17, 40)]
    mixed = tiny_engine.generate(others + [prompt],
                                 [SamplingParams(max_tokens=10, temperature=1.0)] * 3 + [seeded])
    assert mixed[-1].token_ids == alone.token_ids


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([], SamplingParams(), "prompt"),
        ([1] * 5000, SamplingParams(), "prompt"),
        ([10**7], SamplingParams(), "prompt"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
        ([1, 2], SamplingParams(temperature=-0.1), "temperature"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(top_p=1.5), "top_p"),
        ([1, 2], SamplingParams(stop_token_ids=(10**7,)), "stop_token_ids"),
    ],
)
def test_bad_input_raises_a_field_error_and_leaves_the_batch_alone(
    tiny_engine: Engine, prompt: list[int], params: SamplingParams, field: str
) -> None:
    good = SamplingParams(max_tokens=6, temperature=0.0)
    [expected] = tiny_engine.generate([[5, 6, 7]], good)
    rid = tiny_engine.add_request([5, 6, 7], good)
    tiny_engine.step()
    with pytest.raises(InvalidRequestError) as info:
        tiny_engine.add_request(prompt, params)
    assert info.value.field == field
    tokens = [e.token_id for events in tiny_engine.steps() for e in events
              if e.request_id == rid]
    assert tiny_engine.scheduler.blocks.num_free_blocks == tiny_engine.backend.capacity.num_blocks
    assert len(tokens) == 5 and expected.token_ids[1:] == tokens


def test_a_parameter_the_backend_cannot_honour_is_refused_naming_it(
        tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    greedy_only = Capabilities(frozenset({"ignore_eos", "stop_token_ids"}))
    monkeypatch.setattr(tiny_engine.backend, "capabilities", greedy_only)
    with pytest.raises(InvalidRequestError) as info:
        tiny_engine.add_request([1, 2], SamplingParams(temperature=0.0, logprobs=True))
    assert info.value.field == "logprobs" and "not supported" in info.value.message
    with pytest.raises(InvalidRequestError, match="temperature"):
        tiny_engine.add_request([1, 2], SamplingParams(temperature=0.8))
    assert not tiny_engine.has_unfinished()
    rid = tiny_engine.add_request([1, 2], SamplingParams(max_tokens=2, temperature=0.0,
                                                         ignore_eos=True))
    assert rid in tiny_engine.scheduler
    list(tiny_engine.steps())


def test_preempted_requests_resume_and_finish_with_the_same_tokens(tiny_qwen3: Path) -> None:
    prompts = [list(range(100 + 7 * i, 130 + 7 * i)) for i in range(4)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = Engine.from_model_dir(tiny_qwen3, settings=TorchSettings(kv_cache_gb=0.05))
    expected = [c.token_ids for c in roomy.generate(prompts, params)]
    # 16 blocks of 16 tokens: four requests of 70 tokens need 20, so some must be preempted.
    per_block = roomy.backend.kv_cache_bytes() // roomy.backend.capacity.num_blocks
    tight = Engine.from_model_dir(tiny_qwen3,
                                  settings=TorchSettings(kv_cache_gb=16 * per_block / 2**30))
    assert tight.backend.capacity.num_blocks == 16
    tight_ids = [tight.add_request(p, params) for p in prompts]
    requests = [tight.scheduler.get(rid) for rid in tight_ids]
    got: dict[str, list[int]] = {rid: [] for rid in tight_ids}
    for events in tight.steps():
        for e in events:
            got[e.request_id].append(e.token_id)
    assert [got[rid] for rid in tight_ids] == expected
    assert sum(r.num_preemptions for r in requests if r is not None) > 0


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, seed=7, presence_penalty=1.5,
                   frequency_penalty=0.8, repetition_penalty=1.2, ignore_eos=True),
], ids=["greedy", "seeded-penalised"])
@pytest.mark.parametrize("cut", [1, 13, 29])
def test_a_resumed_request_continues_exactly_as_an_uninterrupted_run(
    tiny_engine: Engine, params: SamplingParams, cut: int
) -> None:
    prompt = list(range(40, 60))
    [whole] = tiny_engine.generate([prompt], params)
    rid = tiny_engine.add_request(prompt, params, output_ids=whole.token_ids[:cut])
    events = [e for step in tiny_engine.steps() for e in step if e.request_id == rid]
    assert [e.index for e in events] == list(range(cut, len(whole.token_ids)))
    assert [e.token_id for e in events] == whole.token_ids[cut:]
    assert events[-1].finish_reason == FinishReason.LENGTH


def test_a_resume_with_nothing_left_to_generate_is_refused(tiny_engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as info:
        tiny_engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), output_ids=[4, 5])
    assert info.value.field == "output_ids"


def test_abort_frees_the_requests_blocks_at_once(tiny_engine: Engine) -> None:
    rid = tiny_engine.add_request(list(range(50)), SamplingParams(max_tokens=50))
    tiny_engine.step()
    assert tiny_engine.abort(rid)
    assert not tiny_engine.has_unfinished()
    assert tiny_engine.scheduler.blocks.num_free_blocks == tiny_engine.backend.capacity.num_blocks
    assert not tiny_engine.abort(rid)


def test_token_events_carry_top_logprobs_only_for_requests_that_ask(tiny_engine: Engine) -> None:
    asks = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=True,
                          top_logprobs=4)
    plain = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    tiny_engine.add_request([1, 2, 3], asks, "asks")
    tiny_engine.add_request([1, 2, 3], plain, "plain")
    events = [e for step in tiny_engine.steps() for e in step]
    for e in events:
        if e.request_id == "plain":
            assert e.top_logprobs is None and e.logprob is None
        else:
            assert e.top_logprobs is not None and len(e.top_logprobs) == 4
            assert e.top_logprobs[0][0] == e.token_id  # greedy: the most likely one
            assert e.top_logprobs[0][1] == pytest.approx(e.logprob, abs=1e-6)
    assert sorted(e.request_id for e in events) == ["asks"] * 3 + ["plain"] * 3


def test_the_prefill_cap_is_on_by_default_on_a_cpu_with_avx512_and_0_turns_it_off(
        tiny_qwen3: Path, tiny_engine: Engine) -> None:
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert tiny_engine.prefill_budget.stall == (LATENCY_PREFILL_STALL if avx512 else 0.0)
    assert (tiny_engine.prefill_budget.tokens(4) is not None) == avx512
    on = Engine.from_model_dir(tiny_qwen3, EngineConfig(max_num_seqs=2, max_prefill_stall=0.5),
                               settings=TorchSettings(kv_cache_gb=0.05))
    assert on.prefill_budget.tokens(4) is not None
    off = Engine.from_model_dir(tiny_qwen3, EngineConfig(max_num_seqs=2, max_prefill_stall=0.0),
                                settings=TorchSettings(kv_cache_gb=0.05))
    assert off.prefill_budget.tokens(4) is None


def test_a_prompt_arriving_while_others_decode_is_prefilled_within_the_cap_to_the_same_tokens(
        tiny_qwen3: Path, tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompt = list(range(200, 300))
    [alone] = tiny_engine.generate([prompt], params)
    engine = Engine.from_model_dir(tiny_qwen3, EngineConfig(max_num_seqs=4),
                                   settings=TorchSettings(kv_cache_gb=0.05))
    # the tiny model's prefill costs too little to time against noise: the floor, as asked
    monkeypatch.setattr(engine.prefill_budget, "limits", lambda decodes: (0, 0))
    block = engine.backend.capacity.block_size
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=40, temperature=0.0,
                                                 ignore_eos=True))
    engine.step()
    rid = engine.add_request(prompt, params)
    chunks, got = [], []
    while engine.has_unfinished():
        events = engine.step()
        if engine.last_step.decode_seqs and engine.last_step.prompt_tokens:
            chunks.append(engine.last_step.prompt_tokens)
        got += [e.token_id for e in events if e.request_id == rid]
    assert chunks == [block] * (len(prompt) // block) + [len(prompt) % block]
    assert got == alone.token_ids
    assert engine.prefill_budget.decode_s(1) is not None  # it learns from every step
