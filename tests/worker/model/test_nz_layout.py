"""Ascend's FRACTAL_NZ layout: the conversions both ways, against the element rule
(r, c) -> [c // 16, r, c % 16] and each other."""

from __future__ import annotations

import torch

from worker.model.nz_layout import nd_to_nz, nz_to_nd


def test_nd_to_nz_places_each_element_by_the_rule_and_pads_with_zeros() -> None:
    x = torch.randn(13, 30)
    nz = nd_to_nz(x)
    assert nz.shape == (2, 16, 16)
    for r in range(13):
        for c in range(30):
            assert nz[c // 16, r, c % 16] == x[r, c]
    assert nz[:, 13:].abs().sum() == 0 and nz[1, :, 14:].abs().sum() == 0


def test_the_conversions_invert_each_other_both_ways() -> None:
    x = torch.randn(3, 2, 40, 70)  # leading dims carried along
    assert torch.equal(nz_to_nd(nd_to_nz(x), 40, 70), x)
    z = torch.randn(5, 4, 128, 16)  # aligned: every element of an NZ tensor is data
    assert torch.equal(nd_to_nz(nz_to_nd(z, 128, 64)), z)
    # a KV block [block_size, kv_heads * head_dim] and its NZ form hold the same values
    block = torch.arange(128 * 64, dtype=torch.float32).reshape(128, 64)
    assert torch.equal(nd_to_nz(block).reshape(4, 128, 16)[1, 5], block[5, 16:32])
