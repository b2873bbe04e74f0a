"""A decode step of every decoder layer in one C call (csrc/decoder.c).

For steps that are all decodes (the common case while streaming) and at most `max_rows` of
them, on the CPU kernels with float32, w8a16 or bfloat16 weights; and for steps of at most
`max_rows` tokens with short prefill chunks among them (a capped prefill beside decodes, a
short prompt), each token a row that attends to its sequence up to itself, as a decode does.
The plan holds the pointers of every layer's weights and cache, set once; a step fills in its
inputs and makes one ctypes call where the per-operator path makes about ten per layer. For a
float32 model's decodes it runs the same kernels in the same order as the per-operator path,
so the results are the same bit for bit (prefill rows differ from the per-operator path's
prefill attention by float rounding).

A bfloat16 model's step reads its weights and KV cache in bfloat16 and carries its
activations in float32 (decoder.c; with AMX, or for several rows on AVX512-BF16, the
projections' inputs are rounded to bfloat16); the norms' weights, biases, scales and rotary
tables, a few kilobytes per layer, are held as float32 copies. Its results differ from
PyTorch's bfloat16 operators (which round every intermediate to bfloat16) by that rounding,
the way two bfloat16 implementations do.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from worker.kernels.abi import DecodeStep, Layer, Proj
from worker.model.attention import AttentionMetadata, KVCache, PagedDecode
from worker.model.config import ModelConfig
from worker.model.rope import RotaryEmbedding
from worker.model.weights import ModelWeights

if TYPE_CHECKING:
    from worker.kernels.cpu import CpuKernels

BF16_PLAN_ROWS = 64
"""Most decodes a bfloat16 model's step takes in one call: on a 2-core Zen 4 with AVX512-BF16
(SmolLM2, contexts of 256 tokens) it took 16.8 / 22.8 / 40.2 / 68.7 / 110.5 ms at 4 / 8 / 16
/ 32 / 64 sequences against PyTorch's operators' 31.0 / 40.2 / 65.8 / 95.0 / 140.5 (their
attention gathers a copy of every context; the step's reads the cache in place)."""


class _Held(list[torch.Tensor]):
    """Tensors whose memory C points at, kept alive by being listed."""

    def ptr(self, t: torch.Tensor | None) -> int | None:
        """t's data pointer (None for None), with t held."""
        if t is None:
            return None
        self.append(t)
        return t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as contiguous float32 (t itself when it already is)."""
    return t.float().contiguous() if t is not None else None


def _proj(projection: object, held: _Held) -> Proj | None:
    operand = getattr(projection, "kernel_operand", lambda: None)()
    if operand is None:
        return None
    weight, scale, bias = operand
    out, in_features = weight.shape
    group = in_features if scale is None else in_features * out // scale.numel()
    return Proj(held.ptr(weight), held.ptr(_f32(scale)), held.ptr(_f32(bias)), out,
                in_features, group, weight.dtype == torch.bfloat16)


class DecodePlan:
    """The step and layer structs decoder.c reads, and the owners of their pointers.

    C cannot keep a tensor alive, so every tensor whose data_ptr() goes into a struct is held
    here for as long as the struct holds the pointer: the weights, norms, KV cache and rotary
    tables for the plan's life (`_held`); the scratch until a larger one replaces it and its
    pointer together; and a step's inputs and outputs, in the exact dtype and layout C reads
    (contiguous copies where they were not), until the next step replaces them (`_inputs`).
    """

    def __init__(self, kernels: CpuKernels, cfg: ModelConfig, weights: ModelWeights,
                 cache: KVCache, rope: RotaryEmbedding, layers: ctypes.Array[Layer],
                 held: _Held, max_rows: int, out_dtype: torch.dtype) -> None:
        self.max_rows = max_rows
        self._out_dtype = out_dtype
        self._embed = weights.embed
        self._fn = kernels.cpuk_decode_forward
        self._layers = layers
        self._held = held
        s = self._step = DecodeStep(
            layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, inter=cfg.intermediate_size, slots=cache.num_slots,
            block_size=cache.block_size, max_context=min(rope.cos.shape[0], cache.num_slots),
            cache_bf16=cache.data.dtype == torch.bfloat16, eps=cfg.rms_norm_eps,
            cos=held.ptr(_f32(rope.cos)), sin=held.ptr(_f32(rope.sin)))
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._work = torch.empty(0, dtype=torch.uint8)
        self._grow(kernels.cpuk_decode_workspace(ctypes.byref(s), layers, max_rows))

    @classmethod
    def build(cls, kernels: CpuKernels, cfg: ModelConfig, weights: ModelWeights,
              cache: KVCache, rope: RotaryEmbedding, max_rows: int,
              out_dtype: torch.dtype | None = None) -> DecodePlan | None:
        """The plan, or None when a projection has no kernel the decoder can call (w8a8, or
        a layout only PyTorch takes). out_dtype: the final hidden states' (the activations'
        of the per-operator path), the model's by default."""
        held = _Held()
        layers = (Layer * cfg.num_hidden_layers)()
        for i, lw in enumerate(weights.layers):
            projs = [_proj(p, held) for p in (lw.qkv, lw.o_proj, lw.gate_up, lw.down)]
            if any(p is None for p in projs):
                return None
            nxt = weights.layers[i + 1].input_norm if i + 1 < len(weights.layers) else weights.norm
            norms = (lw.input_norm, lw.post_norm, nxt, lw.q_norm, lw.k_norm)
            layers[i] = Layer(*(held.ptr(_f32(t)) for t in norms), *projs,
                              held.ptr(cache.data[i]))
        held.append(cache.data)  # the layers' views point into it
        return cls(kernels, cfg, weights, cache, rope, layers, held, max_rows,
                   out_dtype or weights.embed.dtype)

    def _grow(self, nbytes: int) -> None:
        """Scratch of nbytes in place of the current one (its pointer replaced with it)."""
        self._work = torch.empty(nbytes, dtype=torch.uint8)
        self._step.work = self._work.data_ptr()
        self._step.work_bytes = nbytes

    def covers(self, meta: AttentionMetadata) -> bool:
        """Whether a step is one this plan runs: at most max_rows rows, each one query token
        attending to its sequence up to itself (decodes, or the runner's short steps laid out
        as such rows)."""
        return not meta.prefills and 0 < meta.num_decodes <= self.max_rows

    def forward(self, ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """ids, positions [n] (one row each) -> final hidden states [n, hidden], in the
        plan's out_dtype."""
        decode = meta.decode
        assert isinstance(decode, PagedDecode)
        residual = F.embedding(ids, self._embed).float()  # a fresh tensor, updated in place
        out = torch.empty_like(residual)
        self._inputs = (positions.to(torch.int64).contiguous(),
                        meta.slot_mapping.to(torch.int64).contiguous(),
                        decode.block_tables.to(torch.int32).contiguous(),
                        decode.context_lens.to(torch.int32).contiguous(), residual, out)
        s = self._step
        s.n = ids.shape[0]
        s.max_blocks = decode.block_tables.shape[1]
        (s.positions, s.slot_mapping, s.block_tables, s.context_lens, s.residual,
         s.out) = (t.data_ptr() for t in self._inputs)
        need = self._fn(ctypes.byref(s), self._layers)
        if need:  # contexts past max_context, or more threads than at build
            self._grow(need)
            need = self._fn(ctypes.byref(s), self._layers)
            assert need == 0, "the decode step asked for scratch twice"
        return out.to(self._out_dtype)
