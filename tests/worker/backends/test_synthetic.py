"""The synthetic backend: the real engine over a fixed step time and deterministic tokens."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.config import EngineConfig
from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams
from worker.backends.base import OutputKind
from worker.backends.registry import BACKENDS, create_backend
from worker.backends.synthetic import SyntheticBackend
from worker.backends.synthetic_settings import FIRST_ID, SyntheticSettings
from worker.engine.engine import Engine


def _engine(model_dir: Path, step_ms: float = 0.0, max_num_seqs: int = 8, vocab: int = 4096
            ) -> Engine:
    return Engine(create_backend("synthetic", model_dir, EngineConfig(max_num_seqs=max_num_seqs),
                                 SyntheticSettings(synthetic_step_ms=step_ms,
                                                   synthetic_vocab=vocab)))


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_it_is_registered_with_its_settings_and_never_the_default() -> None:
    entry = BACKENDS["synthetic"]
    assert entry.settings is SyntheticSettings
    assert next(iter(BACKENDS)) == "torch"


def test_its_engine_has_no_prefill_cap_unless_one_is_set(tiny_qwen3: Path) -> None:
    assert _engine(tiny_qwen3).prefill_budget.tokens(4) is None
    capped = create_backend("synthetic", tiny_qwen3, EngineConfig(max_prefill_stall=0.5),
                            SyntheticSettings())
    assert Engine(capped, EngineConfig(max_prefill_stall=0.5)).prefill_budget.stall == 0.5


def test_a_sequence_gets_the_same_tokens_alone_and_in_a_batch(tiny_qwen3: Path) -> None:
    prompt = [100, 200, 300, 400, 500]
    alone = _engine(tiny_qwen3).generate([prompt], _greedy(24))[0].token_ids
    others = [[7, 8, 9], list(range(40, 80)), [5]]
    batched = _engine(tiny_qwen3).generate([*others, prompt], _greedy(24))[-1].token_ids
    assert alone == batched
    assert len(alone) == 24
    assert len(set(alone)) > 1


def test_tokens_are_ordinary_ids_within_the_vocabulary_and_never_eos(tiny_qwen3: Path) -> None:
    engine = _engine(tiny_qwen3, vocab=50)
    backend = engine.backend
    assert isinstance(backend, SyntheticBackend)
    eos = set(engine.model_config.eos_token_ids)
    out = engine.generate([[1, 2, 3], [9] * 20], _greedy(200))
    for completion in out:
        assert len(completion.token_ids) == 200
        assert all(FIRST_ID <= t < FIRST_ID + 50 for t in completion.token_ids)
        assert not eos & set(completion.token_ids)
    assert backend.capacity.output == OutputKind.TOKENS


def test_an_eos_id_in_the_range_is_skipped(tiny_qwen3: Path) -> None:
    backend = _engine(tiny_qwen3, vocab=16).backend
    assert isinstance(backend, SyntheticBackend)
    backend._eos = frozenset(range(FIRST_ID, FIRST_ID + 15))
    assert {backend.next_token(last, pos) for last in range(30) for pos in range(30)} == {
        FIRST_ID + 15}


def test_every_step_takes_at_least_the_step_time(tiny_qwen3: Path) -> None:
    engine = _engine(tiny_qwen3, step_ms=20)
    engine.add_request([1, 2, 3], _greedy(3))
    start = time.perf_counter()
    steps = sum(1 for _ in engine.steps())
    assert steps == 3
    assert time.perf_counter() - start >= 3 * 0.020


def test_it_honours_greedy_decoding_only(tiny_qwen3: Path) -> None:
    engine = _engine(tiny_qwen3)
    with pytest.raises(InvalidRequestError, match="temperature"):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.7))
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0,
                                                 stop_token_ids=(FIRST_ID,)))


def test_its_kv_cache_holds_the_tokens_asked_and_at_least_one_full_context(
        tiny_qwen3: Path) -> None:
    engine = EngineConfig(max_num_seqs=4, max_model_len=100)
    c = create_backend("synthetic", tiny_qwen3, engine,
                       SyntheticSettings(synthetic_kv_tokens=1000)).capacity
    assert (c.max_seq_len, c.num_blocks * c.block_size) == (100, 1008)
    c = create_backend("synthetic", tiny_qwen3, engine,
                       SyntheticSettings(synthetic_kv_tokens=10)).capacity
    assert c.num_blocks * c.block_size >= 100


@pytest.mark.parametrize("bad", [{"synthetic_step_ms": -1.0}, {"synthetic_vocab": 0},
                                 {"synthetic_kv_tokens": 0}])
def test_bad_settings_are_refused_by_name(bad: dict[str, float]) -> None:
    with pytest.raises(InvalidRequestError, match=next(iter(bad))):
        SyntheticSettings(**bad)  # type: ignore[arg-type]
