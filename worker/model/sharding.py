"""Which part of each weight a tensor-parallel rank holds (Megatron-style).

Attention is split by heads: q/k/v are column-parallel (each rank keeps its heads' rows),
o_proj is row-parallel (the matching columns), and the MLP likewise: gate/up column-parallel
over the intermediate size, down row-parallel. So a layer needs exactly two all-reduces, after
o_proj and after down. When there are fewer KV heads than ranks, each KV head is replicated on
the ranks whose query heads use it. The embedding and the lm_head are split by vocabulary
rows (a lookup is summed over the ranks; logits are gathered on rank 0, which samples); the
norms are replicated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from common.errors import ModelConfigError
from worker.model.config import ModelConfig

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")
_VOCAB = ("embed_tokens", "lm_head")
_PER_OUTPUT_ROW = ("weight", "weight_scale", "weight_offset", "bias", "quant_bias", "deq_scale")
"""Tensors with a row per output channel (npuserve's int8 and msmodelslim's layouts)."""


@dataclass(frozen=True, slots=True)
class Shard:
    rank: int
    world: int

    def check(self, cfg: ModelConfig) -> None:
        """Raise ModelConfigError naming what does not divide among `world` ranks."""
        w = self.world
        problems = []
        if cfg.num_attention_heads % w:
            problems.append(f"{cfg.num_attention_heads} attention heads")
        kv = cfg.num_key_value_heads
        if (kv % w) if kv >= w else (w % kv):
            problems.append(f"{kv} KV heads")
        if cfg.intermediate_size % w:
            problems.append(f"intermediate size {cfg.intermediate_size}")
        if problems:
            raise ModelConfigError(
                f"tensor parallelism over {w} ranks needs each of {', '.join(problems)} to "
                f"divide evenly (KV heads may also be fewer than the ranks and divide them); "
                "choose another --tensor-parallel")

    def config(self, cfg: ModelConfig) -> ModelConfig:
        """The model as this rank sees it: its heads and its share of the MLP."""
        self.check(cfg)
        return dataclasses.replace(
            cfg, num_attention_heads=cfg.num_attention_heads // self.world,
            num_key_value_heads=max(1, cfg.num_key_value_heads // self.world),
            intermediate_size=cfg.intermediate_size // self.world)

    def select(self, name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        """This rank's part of the checkpoint tensor `name` of the full model `cfg`: float or
        int8 weights, their per-channel or per-group scales, biases. A static activation
        scale stays whole (an upper bound for the rank's share of the input too)."""
        parts = name.split(".")
        module, leaf = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
        if module in _COLUMN and leaf in _PER_OUTPUT_ROW:
            return tensor[self._rows(module, cfg)]
        if module in _VOCAB and leaf in ("weight", "weight_scale"):
            return tensor[self.vocab_rows(cfg.vocab_size)]
        if module not in _ROW or leaf not in ("weight", "weight_scale"):
            return tensor
        cols = self._rows("q_proj" if module == "o_proj" else "gate_proj", cfg)
        if leaf == "weight":
            return tensor[:, cols]
        if tensor.dim() < 2 or tensor.shape[1] == 1:
            return tensor  # one scale per output row: every rank's columns share it
        width = (cfg.q_size if module == "o_proj" else cfg.intermediate_size) // tensor.shape[1]
        if cols.start % width or cols.stop % width:
            raise ModelConfigError(
                f"{name}: groups of {width} input columns straddle the {self.world} ranks' "
                "shares; quantize with a group size that divides each share, or per channel")
        return tensor[:, cols.start // width:cols.stop // width]

    def vocab_rows(self, vocab: int) -> slice:
        """This rank's rows of the embedding and lm_head: ceil(vocab / world) each, the last
        rank's fewer when they do not divide."""
        per = -(-vocab // self.world)
        return slice(min(vocab, self.rank * per), min(vocab, (self.rank + 1) * per))

    def _rows(self, module: str, cfg: ModelConfig) -> slice:
        r, w, d = self.rank, self.world, cfg.head_dim
        if module == "q_proj":
            per = cfg.num_attention_heads // w
            return slice(r * per * d, (r + 1) * per * d)
        if module in ("k_proj", "v_proj"):
            kv = cfg.num_key_value_heads
            head = r * kv // w if kv < w else r * (kv // w)
            count = 1 if kv < w else kv // w
            return slice(head * d, (head + count) * d)
        per = cfg.intermediate_size // w
        return slice(r * per, (r + 1) * per)
