"""Memory copy bandwidth and the batch-1 decode floor it implies.

Decode at batch 1 is memory-bound: every step streams all weights through the cores once, so
no implementation can beat `weight bytes / bandwidth` per token. The bandwidth is measured by
the same command that measures decode, because absolute numbers on a shared machine drift.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEFAULT_COPY_BYTES = 512 * 2**20
"""Size of the copied buffer: far past any cache, so it measures DRAM, not L3."""


def measure_copy_bandwidth(
    nbytes: int = DEFAULT_COPY_BYTES, *, repeats: int = 5, device: str = "cpu"
) -> float:
    """Best-of-`repeats` bandwidth of `dst.copy_(src)` in GB/s (1e9 bytes/s).

    A copy reads `nbytes` and writes `nbytes`, so both are counted. The buffers are touched
    once before timing so page faults are not measured.
    """
    import torch

    if nbytes < 4 or repeats < 1:
        raise ValueError(f"need nbytes >= 4 and repeats >= 1, got {nbytes}, {repeats}")
    numel = nbytes // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync = torch.cuda.synchronize if src.is_cuda else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    moved = 2 * numel * 4
    return moved / max(best, 1e-9) / 1e9


def decode_weight_bytes(model: Any) -> int:
    """Bytes of weights one batch-1 decode step reads, counted from a transformers model.

    Every parameter of the decoder layers, the final norm and the lm_head matrix is read
    every step. The input embedding is a gather of one row per token,
    so an untied embedding matrix is left out; a tied one is the lm_head and is counted once
    (parameters are de-duplicated by storage).
    """
    seen: set[int] = set()
    total = 0
    for param in model.parameters():  # a torch.nn.Module with get_{input,output}_embeddings
        key = param.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += param.numel() * param.element_size()
    embed = _weight(model.get_input_embeddings())
    head = model.get_output_embeddings()
    head_weight = _weight(head) if head is not None else None
    tied = head_weight is not None and _same_storage(embed, head_weight)
    if not tied:
        total -= embed.numel() * embed.element_size()
    return total


def _weight(module: object) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if weight is None:
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight  # type: ignore[no-any-return]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def closest_to_floor(decode_ms: list[float], gb_s: list[float]) -> int:
    """The round whose decode is closest to its own floor (decode time times the copy
    bandwidth measured just before it is least): a busy or a lucky moment then lands on both
    sides of the ratio, not on one."""
    if len(decode_ms) != len(gb_s) or not decode_ms:
        raise ValueError(f"need one bandwidth per round, got {len(decode_ms)} and {len(gb_s)}")
    return min(range(len(decode_ms)), key=lambda r: decode_ms[r] * gb_s[r])


def floor_ms_per_token(weight_bytes: int, bandwidth_gb_s: float) -> float:
    """Lower bound on batch-1 decode time, in milliseconds per token."""
    if bandwidth_gb_s <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth_gb_s}")
    return weight_bytes / (bandwidth_gb_s * 1e9) * 1e3
