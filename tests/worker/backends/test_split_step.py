"""Steps of several prompts split over two threads while the governor leaves one thread."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from common.sampling_params import SamplingParams
from worker.backends.base import SequenceChunk
from worker.backends.split_step import MIN_GROUP_TOKENS, split
from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings

PARAMS = SamplingParams()


def chunk(name: str, tokens: int, start: int = 0, sample: bool = True) -> SequenceChunk:
    return SequenceChunk(name, list(range(10, 10 + tokens)), start, [0], sample, PARAMS)


def test_decodes_stay_on_the_first_thread_and_prompts_balance_by_tokens() -> None:
    chunks = [chunk("a", 100), chunk("d1", 1, start=40), chunk("b", 300), chunk("c", 150),
              chunk("d2", 1, start=70), chunk("e", 60)]
    first, second = split(chunks, min_tokens=32) or ([], [])
    assert {1, 4} <= set(first)  # the decodes
    assert sorted(first + second) == list(range(len(chunks)))
    assert first == sorted(first) and second == sorted(second)
    load = [sum(len(chunks[i].token_ids) for i in half) for half in (first, second)]
    assert load == [312, 300]  # "b" alone against the decodes and the rest


@pytest.mark.parametrize("chunks", [
    [chunk("a", 400), chunk("d", 1, start=9)],  # one prompt: it cannot be split
    [chunk("d1", 1, start=9), chunk("d2", 1, start=9)],  # decodes only
    [chunk("a", 20), chunk("b", 20)],  # too little for a second thread
], ids=["one-prompt", "decodes", "short"])
def test_a_step_without_two_halves_of_prompt_work_is_not_split(chunks) -> None:
    assert split(chunks, min_tokens=32) is None


def contended(runner: ModelRunner, threads: int = 1) -> ModelRunner:
    """The runner as the governor leaves it beside a busy process on two cores."""
    runner.governor = SimpleNamespace(threads=threads, budget=2,  # type: ignore[assignment]
                                      maybe_adjust=lambda: threads)
    return runner


@pytest.fixture
def pair(tiny_model_dir):
    model = tiny_model_dir("qwen3")
    settings = TorchSettings(kv_cache_gb=0.02, threads=1, cpu_dispatch=False)
    ours = contended(ModelRunner(model, settings, max_num_seqs=8))
    ref = ModelRunner(model, settings, max_num_seqs=8)
    yield ours, ref
    ours.close()


def steps(rows: int, block_size: int) -> list[list[SequenceChunk]]:
    """Three prompts in one step (each longer than the one-call step takes); their first
    decodes beside two new prompts' first chunks; their next decodes beside the new prompts'
    second chunks. Each step's second half has at least MIN_GROUP_TOKENS tokens."""
    rows = max(rows, MIN_GROUP_TOKENS)
    def seq(name: str, length: int, first_block: int) -> tuple[str, list[int], list[int]]:
        tokens = [(7 * first_block + 3 * j) % 500 + 2 for j in range(length)]
        table = list(range(first_block, first_block + -(-(length + 4) // block_size)))
        return name, tokens, table

    olds = [seq(str(i), rows + extra, 10 * i) for i, extra in enumerate((9, 30, 2))]
    news = [seq("new", 2 * rows + 12, 40), seq("other", 2 * rows + 20, 50)]
    return [
        [SequenceChunk(n, t, 0, b, True, PARAMS) for n, t, b in olds],
        [*(SequenceChunk(n, [t[0] + 1], len(t), b, True, PARAMS) for n, t, b in olds[:2]),
         SequenceChunk("new", news[0][1][:rows + 4], 0, news[0][2], False, PARAMS),
         SequenceChunk("2", [olds[2][1][0] + 1], len(olds[2][1]), olds[2][2], True, PARAMS),
         SequenceChunk("other", news[1][1][:rows + 8], 0, news[1][2], False, PARAMS)],
        [*(SequenceChunk(n, [t[1] + 1], len(t) + 1, b, True, PARAMS) for n, t, b in olds),
         SequenceChunk("new", news[0][1][rows + 4:], rows + 4, news[0][2], True, PARAMS),
         SequenceChunk("other", news[1][1][rows + 8:], rows + 8, news[1][2], True, PARAMS)],
    ]


def test_split_steps_give_the_whole_steps_logits_and_cache(pair, monkeypatch) -> None:
    ours, ref = pair
    assert ours.plan is not None
    names: list[str] = []
    forward = ours.forward
    monkeypatch.setattr(ours, "forward", lambda ids, positions, meta: (
        names.append(threading.current_thread().name), forward(ids, positions, meta))[1])
    for chunks in steps(ours.plan.max_rows, ours.block_size):
        got, want = ours.execute(chunks), ref.execute(chunks)
        assert got is not None and want is not None and got.shape == want.shape
        assert float((got - want).norm() / want.norm()) < 1e-5
    assert float((ours.cache.data - ref.cache.data).abs().max()) < 1e-5
    # every step split: half on the engine's thread, half on the second
    assert names.count(threading.current_thread().name) == 3
    assert sum(n.startswith("split-step") for n in names) == 3


def test_steps_stay_whole_while_the_governor_leaves_two_threads(pair, monkeypatch) -> None:
    ours, ref = pair
    contended(ours, threads=2)
    calls: list[int] = []
    forward = ours.forward
    monkeypatch.setattr(ours, "forward", lambda ids, positions, meta: (
        calls.append(ids.shape[0]), forward(ids, positions, meta))[1])
    first = steps(ours.plan.max_rows, ours.block_size)[0]
    ours.execute(first)
    assert calls == [sum(len(c.token_ids) for c in first)]


def test_the_split_setting_off_keeps_steps_whole(tiny_model_dir) -> None:
    runner = contended(ModelRunner(tiny_model_dir("qwen3"), TorchSettings(
        kv_cache_gb=0.02, threads=1, cpu_dispatch=False, cpu_split_steps=False),
        max_num_seqs=8))
    assert runner._split(steps(runner.plan.max_rows, runner.block_size)[0]) is None


def test_a_failing_half_fails_the_step_after_both_halves_end(pair, monkeypatch) -> None:
    ours, _ = pair
    ended: list[str] = []
    forward = ours.forward

    def first_half(ids, positions, meta):
        out = forward(ids, positions, meta)
        ended.append("first")
        return out

    def second_half(step):
        raise RuntimeError("second half failed")

    monkeypatch.setattr(ours, "forward", first_half)
    monkeypatch.setattr(ours, "_forward_alone", second_half)
    with pytest.raises(RuntimeError, match="second half failed"):
        ours.execute(steps(ours.plan.max_rows, ours.block_size)[0])
    assert ended == ["first"]
