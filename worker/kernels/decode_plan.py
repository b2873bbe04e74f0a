"""A decode step of every decoder layer in one C call (csrc/decoder.c).

For steps that are all decodes (the common case while streaming) and at most `max_rows` of
them, on the CPU kernels with float32 or w8a16 weights. The plan holds the pointers of every
layer's weights and cache, set once; a step fills in its inputs and makes one ctypes call
where the per-operator path makes about ten per layer. It runs the same kernels in the same
order, so the results are the same bit for bit.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from worker.model.attention import AttentionMetadata, KVCache, PagedDecode
from worker.model.config import ModelConfig
from worker.model.rope import RotaryEmbedding
from worker.model.weights import ModelWeights

if TYPE_CHECKING:
    from worker.kernels.cpu import CpuKernels

_P, _I = ctypes.c_void_p, ctypes.c_int64


class _Proj(ctypes.Structure):
    _fields_ = [("weight", _P), ("scale", _P), ("bias", _P), ("out", _I), ("in_", _I),
                ("group", _I)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("next_norm", _P), ("q_norm", _P),
                ("k_norm", _P), ("qkv", _Proj), ("o", _Proj), ("gate_up", _Proj),
                ("down", _Proj), ("cache", _P)]


class _Step(ctypes.Structure):
    _fields_ = [("layers", _I), ("hidden", _I), ("heads", _I), ("kv_heads", _I),
                ("head_dim", _I), ("inter", _I), ("slots", _I), ("block_size", _I),
                ("eps", ctypes.c_float), ("cos", _P), ("sin", _P), ("n", _I),
                ("max_blocks", _I), ("positions", _P), ("slot_mapping", _P),
                ("block_tables", _P), ("context_lens", _P), ("residual", _P), ("out", _P),
                ("work", _P)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _proj(projection: object) -> _Proj | None:
    operand = getattr(projection, "kernel_operand", lambda: None)()
    if operand is None:
        return None
    weight, scale, bias = operand
    out, in_features = weight.shape
    group = in_features if scale is None else in_features * out // scale.numel()
    return _Proj(weight.data_ptr(), _ptr(scale), _ptr(bias), out, in_features, group)


class DecodePlan:
    def __init__(self, kernels: CpuKernels, cfg: ModelConfig, weights: ModelWeights,
                 cache: KVCache, rope: RotaryEmbedding, layers: ctypes.Array[_Layer],
                 max_rows: int) -> None:
        self.max_rows = max_rows
        self._embed = weights.embed
        self._fn = kernels.npu_decode_forward
        self._layers = layers
        self._rope = rope  # keeps the tables the step points at alive
        s = self._step = _Step(
            layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, inter=cfg.intermediate_size, slots=cache.num_slots,
            block_size=cache.block_size, eps=cfg.rms_norm_eps, cos=rope.cos.data_ptr(),
            sin=rope.sin.data_ptr())
        self._work = torch.empty(kernels.npu_decode_workspace(ctypes.byref(s), max_rows))
        s.work = self._work.data_ptr()

    @classmethod
    def build(cls, kernels: CpuKernels, cfg: ModelConfig, weights: ModelWeights,
              cache: KVCache, rope: RotaryEmbedding, max_rows: int) -> DecodePlan | None:
        """The plan, or None when a projection has no kernel the decoder can call (w8a8, or
        a layout only PyTorch takes)."""
        layers = (_Layer * cfg.num_hidden_layers)()
        for i, lw in enumerate(weights.layers):
            projs = [_proj(p) for p in (lw.qkv, lw.o_proj, lw.gate_up, lw.down)]
            if any(p is None for p in projs):
                return None
            nxt = weights.layers[i + 1].input_norm if i + 1 < len(weights.layers) else weights.norm
            layers[i] = _Layer(lw.input_norm.data_ptr(), lw.post_norm.data_ptr(), nxt.data_ptr(),
                               _ptr(lw.q_norm), _ptr(lw.k_norm), *projs,
                               cache.data[i].data_ptr())
        return cls(kernels, cfg, weights, cache, rope, layers, max_rows)

    def covers(self, meta: AttentionMetadata) -> bool:
        """Whether a step is one this plan runs: decodes only, at most max_rows of them."""
        return not meta.prefills and 0 < meta.num_decodes <= self.max_rows

    def forward(self, ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """ids, positions [n] (all decodes) -> final hidden states [n, hidden]."""
        decode = meta.decode
        assert isinstance(decode, PagedDecode)
        residual = F.embedding(ids, self._embed)  # a fresh tensor, updated in place
        out = torch.empty_like(residual)
        s = self._step
        s.n = ids.shape[0]
        s.max_blocks = decode.block_tables.shape[1]
        s.positions = positions.data_ptr()
        s.slot_mapping = meta.slot_mapping.data_ptr()
        s.block_tables = decode.block_tables.data_ptr()
        s.context_lens = decode.context_lens.data_ptr()
        s.residual = residual.data_ptr()
        s.out = out.data_ptr()
        if self._fn(ctypes.byref(s), self._layers) != 0:
            raise MemoryError("the decode step could not allocate its scratch memory")
        return out
