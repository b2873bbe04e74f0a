"""Copy bandwidth and the decode floor derived from it."""

from __future__ import annotations

import pytest
import torch

from worker.bench.bandwidth import (
    closest_to_floor,
    decode_weight_bytes,
    floor_ms_per_token,
    measure_copy_bandwidth,
)


def test_copy_bandwidth_is_a_positive_finite_number() -> None:
    gb_s = measure_copy_bandwidth(4 * 2**20, repeats=2)
    assert 0 < gb_s < float("inf")


def test_floor_is_bytes_over_bandwidth() -> None:
    assert floor_ms_per_token(2_000_000_000, 20.0) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        floor_ms_per_token(1, 0.0)


class _TinyLM(torch.nn.Module):
    """The shape decode_weight_bytes looks at: embedding, one layer, norm, lm_head."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)
        self.layer = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.lm_head = torch.nn.Linear(16, 100, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


def test_tied_embedding_is_counted_once_as_the_lm_head() -> None:
    model = _TinyLM(tied=True)
    all_params = sum(p.numel() for p in model.parameters()) * 4  # parameters() de-duplicates
    assert decode_weight_bytes(model) == all_params


def test_untied_input_embedding_is_not_read_per_step() -> None:
    model = _TinyLM(tied=False)
    all_params = sum(p.numel() for p in model.parameters()) * 4
    assert decode_weight_bytes(model) == all_params - 100 * 16 * 4


def test_the_round_closest_to_its_own_floor_decides() -> None:
    """The fastest decode measured at the lowest bandwidth is not the pick: a round is judged
    against the bandwidth of its own moment."""
    assert closest_to_floor([10.0, 9.0, 12.0], [30.0, 40.0, 20.0]) == 2  # 300 / 360 / 240
    assert closest_to_floor([9.0], [40.0]) == 0
    with pytest.raises(ValueError, match="one bandwidth per round"):
        closest_to_floor([9.0, 8.0], [40.0])
