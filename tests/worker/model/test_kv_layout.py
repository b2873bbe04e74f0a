"""The KV cache layout belongs to the op set: a set with another layout (block-major with
128-token blocks, what Ascend's paged-attention kernels take) runs the same model with the
same logits, and nothing outside the set reads or writes the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from common.sampling_params import SamplingParams
from worker.backends.base import SequenceChunk
from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings
from worker.model import ops as ops_module
from worker.model.attention import KVCache, PagedDecode
from worker.model.ops import DecoderOps

GREEDY = SamplingParams(temperature=0.0)


class BlockMajorOps(DecoderOps):
    """Per layer [blocks, block_size, kv_heads, head_dim] for keys and for values; decode and
    prefill attention read the blocks of a table instead of gathered slots."""

    name = "block-major"
    default_block_size = 128

    def kv_cache_shape(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        return (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)

    def store_kv(self, cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
        kv_heads, dim = k.shape[1:]
        cache.data[layer, 0].view(-1, kv_heads, dim).index_copy_(0, slots, k)
        cache.data[layer, 1].view(-1, kv_heads, dim).index_copy_(0, slots, v)

    def decode_metadata(self, tables: torch.Tensor, lens: torch.Tensor, cache: KVCache
                        ) -> PagedDecode:
        return PagedDecode(tables.to(torch.int32), lens.to(torch.int32))

    def decode_attention(self, q: torch.Tensor, cache: KVCache, layer: int,
                         decode: Any) -> torch.Tensor:
        out = torch.empty_like(q)
        for i, (table, length) in enumerate(zip(decode.block_tables.tolist(),
                                                decode.context_lens.tolist(), strict=True)):
            keys, values = self._context(cache, layer, table, length)
            out[i] = self.prefill_attention(q[i:i + 1], keys, values)[0]
        return out

    def prefill_context(self, block_table: list[int], context_len: int, cache: KVCache) -> Any:
        return block_table, context_len

    def chunk_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cache: KVCache, layer: int, context: Any) -> torch.Tensor:
        if context is None:
            return super().chunk_attention(q, k, v, cache, layer, None)
        keys, values = self._context(cache, layer, *context)
        return self.prefill_attention(q, keys, values)

    @staticmethod
    def _context(cache: KVCache, layer: int, table: list[int], length: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` cached keys and values of a block table, [KVH, length, D]."""
        blocks = torch.tensor(table[: -(-length // cache.block_size)])
        kv = cache.data[layer][:, blocks]  # [2, nb, bs, KVH, D]
        kv = kv.reshape(2, -1, *kv.shape[-2:])[:, :length]
        return kv[0].transpose(0, 1), kv[1].transpose(0, 1)


def runner(model_dir: Path, monkeypatch: pytest.MonkeyPatch, ops: type[DecoderOps]
           ) -> ModelRunner:
    with monkeypatch.context() as patch:
        patch.setattr("worker.backends.torch_runner.DecoderOps", ops)
        return ModelRunner(model_dir, TorchSettings(cpu_kernels=False, kv_cache_gb=0.05),
                           max_num_seqs=4)


def test_a_block_major_op_set_gives_the_logits_of_the_default_layout(
        tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = runner(tiny_qwen3, monkeypatch, ops_module.DecoderOps)
    block_major = runner(tiny_qwen3, monkeypatch, BlockMajorOps)
    assert type(block_major.ops) is BlockMajorOps and block_major.block_size == 128
    assert block_major.cache.data.shape[2:] == (block_major.cache.num_blocks, 128, 2, 32)
    prompts = {"a": list(range(1000, 1150)), "b": list(range(2000, 2040))}
    fed = {rid: 0 for rid in prompts}

    def step(r: ModelRunner, feeds: dict[str, int]) -> torch.Tensor:
        """Each request's next `feeds[rid]` tokens (teacher-forced) as one step's chunks."""
        bs = r.block_size
        chunks = []
        for index, (rid, n) in enumerate(feeds.items()):
            start = fed[rid]
            per_request = -(-400 // bs)
            table = list(range(index * per_request, (index + 1) * per_request))
            chunks.append(SequenceChunk(rid, prompts[rid][start:start + n], start, table,
                                        True, GREEDY))
        logits = r.execute(chunks)
        assert logits is not None
        return logits

    # A first chunk, a chunk after cached context (two blocks of 128), then decodes together.
    schedule = [{"a": 100, "b": 30}, {"a": 40, "b": 9}] + [{"a": 1, "b": 1}] * 3
    for feeds in schedule:
        ours, theirs = step(default, feeds), step(block_major, feeds)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
        for rid, n in feeds.items():
            fed[rid] += n
