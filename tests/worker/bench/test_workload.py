"""The benchmark workload: seeded, within its length ranges, free of special tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.bench.workload import (
    OUTPUT_LEN_RANGE,
    PROMPT_LEN_RANGE,
    make_shared_prefix_workload,
    make_workload,
    special_token_ids,
    workload_for_model,
)

SPECIALS = {0, 1, 2, 7}


def test_same_seed_gives_identical_workload() -> None:
    a = make_workload(16, 500, SPECIALS, seed=3)
    b = make_workload(16, 500, SPECIALS, seed=3)
    assert a == b


def test_different_seeds_give_different_prompts() -> None:
    a = make_workload(16, 500, SPECIALS, seed=3)
    b = make_workload(16, 500, SPECIALS, seed=4)
    assert [r.prompt_ids for r in a.requests] != [r.prompt_ids for r in b.requests]


def test_lengths_stay_within_ranges_and_spread_over_them() -> None:
    w = make_workload(64, 500, SPECIALS, seed=0)
    prompts = [len(r.prompt_ids) for r in w.requests]
    outputs = [r.max_new_tokens for r in w.requests]
    assert PROMPT_LEN_RANGE[0] <= min(prompts) and max(prompts) <= PROMPT_LEN_RANGE[1]
    assert OUTPUT_LEN_RANGE[0] <= min(outputs) and max(outputs) <= OUTPUT_LEN_RANGE[1]
    # stratified: each quarter of each range holds about a quarter of the requests
    for values, (lo, hi) in ((prompts, PROMPT_LEN_RANGE), (outputs, OUTPUT_LEN_RANGE)):
        quarter = (hi - lo + 1) / 4
        counts = [
            sum(lo + q * quarter <= v < lo + (q + 1) * quarter for v in values) for q in range(4)
        ]
        assert all(15 <= c <= 17 for c in counts), counts


def test_even_a_few_requests_cover_short_and_long_outputs() -> None:
    outputs = [r.max_new_tokens for r in make_workload(4, 500, SPECIALS, seed=1).requests]
    assert min(outputs) < 80 and max(outputs) > 190


def test_prompts_avoid_special_tokens_and_stay_in_vocabulary() -> None:
    w = make_workload(32, 12, SPECIALS, seed=0)
    used = {t for r in w.requests for t in r.prompt_ids}
    assert used <= set(range(12)) - SPECIALS
    assert used == set(range(12)) - SPECIALS  # small vocabulary: every allowed id shows up


def test_totals_add_up() -> None:
    w = make_workload(5, 500, SPECIALS, seed=0)
    assert w.total_prompt_tokens == sum(len(r.prompt_ids) for r in w.requests)
    assert w.total_output_tokens == sum(r.max_new_tokens for r in w.requests)


def test_rejects_an_empty_workload_or_vocabulary() -> None:
    with pytest.raises(ValueError):
        make_workload(0, 500, SPECIALS)
    with pytest.raises(ValueError):
        make_workload(4, 3, {0, 1, 2})


def _write(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def test_special_ids_come_from_config_and_tokenizer_files(tmp_path: Path) -> None:
    _write(tmp_path / "config.json", {"vocab_size": 64, "bos_token_id": 1, "eos_token_id": [2, 3]})
    _write(tmp_path / "generation_config.json", {"pad_token_id": 4})
    _write(
        tmp_path / "tokenizer.json",
        {
            "model": {"vocab": {f"t{i}": i for i in range(50)}},
            "added_tokens": [{"id": 50, "content": "<|im_start|>"}],
        },
    )
    _write(tmp_path / "tokenizer_config.json", {"added_tokens_decoder": {"0": {}, "51": {}}})
    assert special_token_ids(tmp_path) == {0, 1, 2, 3, 4, 50, 51}

    w = workload_for_model(tmp_path, 8, seed=0)
    used = {t for r in w.requests for t in r.prompt_ids}
    assert used <= set(range(5, 50))  # below the tokenizer's 50 ordinary ids, not the 64 rows


def test_shared_prefix_prompts_start_with_the_same_tokens_and_then_differ() -> None:
    w = make_shared_prefix_workload(4, 500, SPECIALS, prefix_len=32, own_len=8, output_len=5,
                                    seed=1)
    assert w == make_shared_prefix_workload(4, 500, SPECIALS, prefix_len=32, own_len=8,
                                            output_len=5, seed=1)
    prompts = [r.prompt_ids for r in w.requests]
    assert all(len(p) == 40 and p[:32] == prompts[0][:32] for p in prompts)
    assert len({tuple(p[32:]) for p in prompts}) == 4
    assert all(r.max_new_tokens == 5 for r in w.requests)
    assert not SPECIALS & {t for p in prompts for t in p}
