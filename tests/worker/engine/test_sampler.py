"""The sampler: each row gets exactly its own parameters, and a seed fixes its tokens."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from common.sampling_params import SamplingParams
from worker.engine.sampler import (
    Sampler,
    SampleRow,
    apply_penalties,
    greedy_ids,
    make_generator,
)

CPU = torch.device("cpu")
VOCAB = 50


def _row(
    seed: int = 0, prompt: Sequence[int] = (), output: Sequence[int] = (), **params: Any
) -> SampleRow:
    p = SamplingParams(**params)
    return SampleRow(p, list(prompt), list(output), None if p.greedy else make_generator(seed, CPU))


def _logits(seed: int, rows: int = 1, scale: float = 1.0) -> torch.Tensor:
    """Fixed pseudo-random logits ([rows, VOCAB]) that do not depend on the global RNG."""
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def _from_probs(head: Sequence[float]) -> torch.Tensor:
    """Logits ([VOCAB]) whose softmax gives tokens 0.. the `head` probabilities; the other
    tokens share what is left equally."""
    rest = (1.0 - sum(head)) / (VOCAB - len(head))
    return torch.tensor([math.log(p) for p in head] + [math.log(rest)] * (VOCAB - len(head)))


def _draws(logits: torch.Tensor, n: int = 400, sampler: Sampler | None = None,
           **params: Any) -> Counter[int]:
    """Tokens from `n` rows that share one logits row ([VOCAB]) and differ only in seed."""
    rows = [_row(seed, **params) for seed in range(n)]
    result = (sampler or Sampler())(logits.expand(n, VOCAB).contiguous(), rows)
    return Counter(result.token_ids)


def test_greedy_picks_argmax() -> None:
    logits = _logits(1, rows=4)
    result = Sampler()(logits, [_row(temperature=0.0) for _ in range(4)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.logprobs == [None] * 4


def test_top_k_1_equals_greedy() -> None:
    logits = _logits(2, scale=0.3)[0]  # flat enough that an unfiltered draw would wander
    assert _draws(logits, top_k=1).keys() == {int(logits.argmax())}


def test_top_k_restricts_support_to_the_k_most_likely_tokens() -> None:
    logits = _logits(3, scale=0.3)[0]
    top5 = set(logits.topk(5).indices.tolist())
    assert set(_draws(logits, top_k=5)) == top5


def test_ties_at_the_kth_token_are_kept_and_drawn_alike_whatever_the_batch() -> None:
    logits = torch.full((VOCAB,), -3.0)
    top = [40, 5, 22, 33, 9, 17]  # likelihood order is not vocabulary order
    logits[top] = torch.tensor([3.0, 2.5, 2.0, 1.0, 1.0, 1.0])  # a three-way tie for 4th place
    n = 200
    alone = Sampler()(logits.expand(n, VOCAB).contiguous(),
                      [_row(seed, top_k=4) for seed in range(n)]).token_ids
    assert set(alone) == set(top)
    # A neighbour with a larger k widens the candidates examined, which changes the code
    # path for the tied rows but must not change their draws.
    rows = [_row(seed, top_k=4) for seed in range(n)] + [_row(999, top_k=40)]
    together = Sampler()(logits.expand(n + 1, VOCAB).contiguous(), rows).token_ids
    assert together[:n] == alone


def test_tokens_with_minus_infinity_logits_are_never_drawn() -> None:
    logits = torch.zeros(VOCAB)
    logits[10:] = float("-inf")
    assert set(_draws(logits, temperature=50.0)) == set(range(10))
    assert set(_draws(logits, top_p=0.99, min_p=0.01)) == set(range(10))


@pytest.mark.parametrize("probe", [1024, 2], ids=["probe-covers", "full-sort-fallback"])
def test_top_p_keeps_the_smallest_nucleus_reaching_p(probe: int) -> None:
    logits = _from_probs([0.4, 0.3, 0.2, 0.06])
    sampler = Sampler(nucleus_probe=probe)
    assert set(_draws(logits, top_p=0.65, sampler=sampler)) == {0, 1}
    assert set(_draws(logits, top_p=0.75, sampler=sampler)) == {0, 1, 2}


def test_top_p_after_top_k_measures_mass_within_the_top_k() -> None:
    # Renormalised over the top 3 (mass 0.9): 0.44, 0.33, 0.22, so p = 0.75 needs two tokens;
    # over the full distribution it would need three.
    logits = _from_probs([0.4, 0.3, 0.2, 0.06])
    assert set(_draws(logits, top_k=3, top_p=0.75)) == {0, 1}


def test_min_p_drops_tokens_below_min_p_times_the_top_probability() -> None:
    logits = _from_probs([0.4, 0.3, 0.2, 0.06])
    assert set(_draws(logits, min_p=0.6)) == {0, 1}  # keeps p >= 0.24
    assert set(_draws(logits, min_p=0.4)) == {0, 1, 2}  # keeps p >= 0.16


def test_draws_follow_the_distribution() -> None:
    logits = _from_probs([0.5, 0.3, 0.2 - 1e-6])
    counts = _draws(logits, n=3000)
    for token, p in [(0, 0.5), (1, 0.3), (2, 0.2)]:
        assert counts[token] / 3000 == pytest.approx(p, abs=0.03)


def test_near_zero_temperature_is_greedy() -> None:
    logits = _logits(4, scale=0.3)[0]
    assert _draws(logits, temperature=1e-4).keys() == {int(logits.argmax())}


def test_high_temperature_spreads_the_draws() -> None:
    logits = torch.zeros(VOCAB)
    logits[7] = 5.0  # p = 0.75 at temperature 1
    cool, hot = _draws(logits, temperature=1.0), _draws(logits, temperature=100.0)
    assert cool[7] > 250
    assert hot[7] < 40 and len(hot) > 45


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = _logits(5)
    logits[0, :4] = torch.tensor([2.0, -2.0, 3.0, -1.0])
    row = _row(prompt=[0], output=[1], temperature=0.0, repetition_penalty=2.0)
    penalised = apply_penalties(logits, [row])
    expected = logits.clone()
    expected[0, 0], expected[0, 1] = 1.0, -4.0  # prompt token halved, output token doubled
    torch.testing.assert_close(penalised, expected, rtol=0, atol=0)


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = _logits(6)
    row = _row(prompt=[7, 3], output=[3, 3, 3, 5], temperature=0.0,
               presence_penalty=0.5, frequency_penalty=0.25)
    expected = logits.clone()
    expected[0, 3] -= 0.5 + 3 * 0.25
    expected[0, 5] -= 0.5 + 1 * 0.25  # token 7 is only in the prompt: untouched
    torch.testing.assert_close(apply_penalties(logits, [row]), expected)


def test_penalties_apply_to_greedy_rows() -> None:
    logits = torch.full((2, VOCAB), -5.0)
    logits[0, :2] = torch.tensor([3.0, 2.0])  # 3 / 2 < 2
    logits[1, :2] = torch.tensor([-1.0, -1.5])  # -1 * 2 < -1.5
    rows = [_row(prompt=[0], temperature=0.0, repetition_penalty=2.0),
            _row(output=[0], temperature=0.0, repetition_penalty=2.0)]
    assert Sampler()(logits, rows).token_ids == [1, 1]
    assert Sampler()(logits, [_row(temperature=0.0)] * 2).token_ids == [0, 0]


def _companions() -> list[SampleRow]:
    return [_row(temperature=0.0), _row(seed=11, top_k=5), _row(seed=12, temperature=1.7),
            _row(seed=13, top_p=0.5, output=[1, 2, 2], presence_penalty=1.0)]


def _run_steps(position: int | None, steps: int = 6) -> list[int]:
    """Tokens a seeded request draws over `steps` steps, alone (position None) or at
    `position` among fresh companions that get different logits each step."""
    target = _row(seed=1234, prompt=[4, 9], temperature=0.8, top_k=20, top_p=0.9,
                  repetition_penalty=1.1, frequency_penalty=0.2)
    companions = _companions() if position is not None else []
    tokens: list[int] = []
    target.output_ids = tokens  # the request's output grows as it decodes
    for step in range(steps):
        mine = _logits(100 + step, scale=0.5)
        others = _logits(200 + step, rows=len(companions))
        at = position if position is not None and position >= 0 else len(companions)
        batch = torch.cat([others[:at], mine, others[at:]])
        rows = companions[:at] + [target] + companions[at:]
        tokens.append(Sampler()(batch, rows).token_ids[at])
    return tokens


def test_same_seed_gives_same_tokens_alone_first_or_last_in_a_mixed_batch() -> None:
    alone = _run_steps(None)
    assert len(set(alone)) > 1  # really sampling, not stuck on one token
    assert _run_steps(0) == alone
    assert _run_steps(-1) == alone
    assert _run_steps(2) == alone


def test_different_seeds_give_different_tokens() -> None:
    logits = _logits(7, rows=8, scale=0.3)
    first = Sampler()(logits, [_row(seed=1) for _ in range(8)]).token_ids
    second = Sampler()(logits, [_row(seed=2) for _ in range(8)]).token_ids
    assert first != second


def test_each_row_of_a_mixed_batch_gets_what_it_gets_alone() -> None:
    # One logits row for all, so any parameter that leaked to a neighbour would change its draws.
    specs: list[dict[str, Any]] = [
        {"temperature": 0.0},
        {"top_k": 3},
        {"top_p": 0.5},
        {"min_p": 0.5},
        {"temperature": 2.0},
        {"prompt": [0, 1, 2], "output": [3], "repetition_penalty": 1.8},
        {"output": [4, 4, 5], "presence_penalty": 1.5, "frequency_penalty": 1.0,
         "temperature": 0.0},
    ]
    logits = _logits(8, scale=0.5)
    for seed in range(25):
        batch = [_row(seed=seed * 10 + i, **spec) for i, spec in enumerate(specs)]
        together = Sampler()(logits.expand(len(specs), VOCAB).contiguous(), batch).token_ids
        alone = [Sampler()(logits, [_row(seed=seed * 10 + i, **spec)]).token_ids[0]
                 for i, spec in enumerate(specs)]
        assert together == alone


def test_logprobs_are_log_softmax_of_raw_logits_and_none_when_not_asked() -> None:
    logits = _logits(9, rows=3)
    rows = [_row(seed=1, output=[2, 2], temperature=0.7, top_k=4, frequency_penalty=1.0,
                 logprobs=True),
            _row(seed=2, top_p=0.8),
            _row(temperature=0.0, prompt=[5], repetition_penalty=1.5, logprobs=True)]
    result = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert result.logprobs[1] is None
    for i in (0, 2):
        assert result.logprobs[i] == pytest.approx(float(raw[i, result.token_ids[i]]), abs=1e-5)


def test_top_logprobs_are_the_most_likely_tokens_of_the_raw_distribution() -> None:
    logits = _logits(11, rows=3)
    rows = [_row(seed=1, temperature=0.9, logprobs=True, top_logprobs=5),
            _row(temperature=0.0, logprobs=True),
            _row(temperature=0.0, repetition_penalty=2.0, prompt=[0], logprobs=True,
                 top_logprobs=2)]
    result = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert result.top[1] is None
    for i, k in ((0, 5), (2, 2)):
        top = result.top[i]
        assert top is not None and len(top) == k
        values, ids = raw[i].topk(k)
        assert [t for t, _ in top] == ids.tolist()
        assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-5)
    # the greedy row's choice is its most likely raw token: first among its alternatives
    assert result.top[2] is not None and result.top[2][0][1] >= result.logprobs[2]
    none_asked = Sampler()(logits, [_row(temperature=0.0, logprobs=True) for _ in range(3)])
    assert none_asked.top == []


def test_greedy_fast_path_matches_the_general_path() -> None:
    logits = _logits(10, rows=8)
    fast = Sampler()(logits, [_row(temperature=0.0) for _ in range(8)])
    # Asking one row for logprobs takes the general path.
    general = Sampler()(logits, [_row(temperature=0.0, logprobs=i == 3) for i in range(8)])
    assert fast.token_ids == general.token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_ids_choose_as_argmax_does_on_ties_nan_and_infinities() -> None:
    x = torch.zeros(4, VOCAB)
    x[0, 7] = x[0, VOCAB - 3] = 1.0  # a tie: the first wins
    x[1, 5], x[1, 9] = float("nan"), float("inf")
    x[2] = -float("inf")
    x[3] = torch.randint(0, 3, (VOCAB,)).float()  # many ties
    assert greedy_ids(x).tolist() == x.argmax(dim=-1).tolist() == [7, 5, 0, int(x[3].argmax())]
    assert greedy_ids(x.bfloat16()).tolist() == x.bfloat16().argmax(dim=-1).tolist()


def test_sampling_row_without_generator_is_rejected() -> None:
    row = SampleRow(SamplingParams(temperature=1.0), [], [], None)
    with pytest.raises(ValueError, match="no generator"):
        Sampler()(_logits(11), [row])


def test_make_generator_is_reproducible_when_seeded_and_fresh_when_not() -> None:
    def draw(g: torch.Generator) -> list[float]:
        return torch.rand(4, generator=g).tolist()

    assert draw(make_generator(5, CPU)) == draw(make_generator(5, CPU))
    assert draw(make_generator(None, CPU)) != draw(make_generator(None, CPU))
