"""Ascend's FRACTAL_NZ layout, which the 310P attention kernels read their KV cache and
masks in, and the conversions to and from the usual row-major (ND) layout.

A matrix [rows, cols] in NZ is cut into 16-column strips, each stored whole, one after the
other: [cols / 16, rows, 16] (both sides padded to 16). So element (r, c) lives at
[c // 16, r, c % 16]. A KV block of `block_size` tokens of kv_heads * head_dim features is
such a matrix: the 310P cache is [blocks, kv_heads * head_dim / 16, block_size, 16] per
layer, which is why kv_heads * head_dim must be a multiple of 16 there. torch_npu marks a
tensor as NZ with `npu_format_cast(tensor, ACL_FORMAT_FRACTAL_NZ)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACL_FORMAT_FRACTAL_NZ = 29
"""torch_npu's format id for FRACTAL_NZ (ACL_FORMAT_ND is 2)."""
FRACTAL = 16


def round_up(n: int, multiple: int = FRACTAL) -> int:
    return -(-n // multiple) * multiple


def nd_to_nz(x: torch.Tensor) -> torch.Tensor:
    """[..., rows, cols] -> [..., cols / 16, rows, 16], both padded to 16 with zeros."""
    rows, cols = x.shape[-2:]
    padded = F.pad(x, (0, round_up(cols) - cols, 0, round_up(rows) - rows))
    strips = padded.reshape(*x.shape[:-2], round_up(rows), round_up(cols) // FRACTAL, FRACTAL)
    return strips.transpose(-3, -2).contiguous()


def nz_to_nd(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[..., cols / 16, rows (padded), 16] -> [..., rows, cols]: the inverse of nd_to_nz."""
    strips, padded_rows = x.shape[-3], x.shape[-2]
    nd = x.transpose(-3, -2).reshape(*x.shape[:-3], padded_rows, strips * FRACTAL)
    return nd[..., :rows, :cols].contiguous()
