"""The PyTorch backend: CPU, CUDA, and Ascend NPUs through torch_npu, ragged batches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from common.config import EngineConfig
from common.errors import ModelConfigError
from worker.backends.base import Backend, BackendCapacity, SequenceChunk, StepResult
from worker.kernels.cpu import CpuKernels, cpu_kernels
from worker.kernels.cpu_ops import KernelOps, supports
from worker.kernels.decode_plan import DecodePlan
from worker.model.attention import AttentionMetadata, KVCache, PrefillSegment
from worker.model.config import ModelConfig
from worker.model.linear import KERNEL_ROWS
from worker.model.ops import DecoderOps
from worker.model.rope import RotaryEmbedding
from worker.model.transformer import compute_logits, forward
from worker.model.weights import load_weights

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name.startswith("npu"):
        try:
            import torch_npu  # noqa: F401  (registers the "npu" device with torch)
        except ImportError as e:
            raise ModelConfigError(
                f"device {name!r} needs torch_npu (Ascend CANN); install it or use cpu/cuda"
            ) from e
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelConfigError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "npu":
        return int(torch.npu.mem_get_info(device)[0])  # type: ignore[attr-defined]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemFree"])


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.model_config = cfg = ModelConfig.from_dir(model_dir)
        self.device = resolve_device(config.device)
        self.dtype = getattr(torch, config.dtype)
        kernels = self._kernels(cfg) if config.cpu_kernels else None
        self.ops = KernelOps(kernels) if kernels is not None else DecoderOps()
        self.weights = load_weights(model_dir, cfg, self.dtype, self.device,
                                    pack=config.cpu_packed_weights, kernels=kernels)
        max_len = min(cfg.max_position_embeddings, config.max_model_len or 1 << 30)
        self.rope = RotaryEmbedding(cfg, max_len, self.device, self.dtype)

        per_block = KVCache.bytes_per_block(cfg.num_hidden_layers, config.block_size,
                                            cfg.num_key_value_heads, cfg.head_dim, self.dtype)
        if config.kv_cache_gb is not None:
            budget = int(config.kv_cache_gb * (1 << 30))
        else:
            budget = int(free_memory_bytes(self.device) * config.kv_cache_fraction)
        # More blocks than max_num_seqs full-length sequences can use would only hold memory.
        useful = config.max_num_seqs * -(-max_len // config.block_size)
        num_blocks = min(budget // per_block, useful)
        if num_blocks < 1:
            raise ModelConfigError(
                f"KV cache budget of {budget} bytes holds no block of {per_block} bytes; "
                "raise --kv-cache-gb"
            )
        self.cache = KVCache(cfg.num_hidden_layers, num_blocks, config.block_size,
                             cfg.num_key_value_heads, cfg.head_dim, self.dtype, self.device)
        self.plan = (DecodePlan.build(kernels, cfg, self.weights, self.cache, self.rope,
                                      min(config.max_num_seqs, KERNEL_ROWS))
                     if kernels is not None else None)
        self.capacity = BackendCapacity(
            max_batch=config.max_num_seqs,
            max_seq_len=min(max_len, num_blocks * config.block_size),
            max_tokens_per_step=config.max_num_batched_tokens,
            block_size=config.block_size,
            num_blocks=num_blocks,
        )
        log.info("torch backend on %s (%s, %s ops): weights %.1f MiB (%.1f MiB read per step), "
                 "KV cache %.1f MiB in %d blocks", self.device, config.dtype, self.ops.name,
                 self.weight_memory_bytes() / 2**20, self.weight_bytes() / 2**20,
                 self.kv_cache_bytes() / 2**20, num_blocks)

    def _kernels(self, cfg: ModelConfig) -> CpuKernels | None:
        """The compiled CPU kernels, if they can run this model here."""
        reason = supports(cfg, self.device, self.dtype)
        if reason is not None:
            if self.device.type == "cpu":
                log.info("CPU kernels not used: %s", reason)
            return None
        return cpu_kernels()

    def forward(self, ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """ids, positions [T] -> final hidden states [T, hidden]; the cache is updated."""
        if self.plan is not None and self.plan.covers(meta):
            return self.plan.forward(ids, positions, meta)
        return forward(self.model_config, self.weights, self.rope, ids, positions, self.cache,
                       meta, self.ops)

    def weight_bytes(self) -> int:
        return self.weights.nbytes_per_decode_step()

    def weight_memory_bytes(self) -> int:
        return self.weights.resident_bytes()

    def kv_cache_bytes(self) -> int:
        return self.cache.data.nbytes

    @torch.inference_mode()
    def execute(self, chunks: Sequence[SequenceChunk]) -> StepResult:
        # Decodes first, attended as one padded batch; prefill chunks after, one by one.
        order = sorted(range(len(chunks)), key=lambda i: not chunks[i].is_decode)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_at: dict[int, int] = {}  # chunk index -> row of its last token
        for i in order:
            c = chunks[i]
            bs = self.cache.block_size
            for p in range(c.start_pos, c.start_pos + len(c.token_ids)):
                slots.append(c.block_table[p // bs] * bs + p % bs)
            positions.extend(range(c.start_pos, c.start_pos + len(c.token_ids)))
            ids.extend(c.token_ids)
            if c.sample:
                sample_at[i] = len(ids) - 1
        meta = self._metadata([chunks[i] for i in order], slots)
        dev = self.device
        hidden = self.forward(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                              meta)
        rows = [sample_at[i] for i in range(len(chunks)) if i in sample_at]
        if not rows:
            return StepResult(logits=None)
        return StepResult(logits=compute_logits(self.weights, hidden[torch.tensor(rows, device=dev)]))

    def _metadata(self, ordered: list[SequenceChunk], slot_list: list[int]) -> AttentionMetadata:
        dev, bs = self.device, self.cache.block_size
        decodes = [c for c in ordered if c.is_decode]
        decode = None
        if decodes:
            lens = torch.tensor([c.start_pos + 1 for c in decodes])
            width = max(len(c.block_table) for c in decodes)
            tables = torch.tensor([c.block_table + [0] * (width - len(c.block_table))
                                   for c in decodes])
            decode = self.ops.decode_metadata(tables, lens, self.cache)
        prefills = []
        start = len(decodes)
        for c in ordered[len(decodes):]:
            end = start + len(c.token_ids)
            seg = PrefillSegment(start, end, None)
            if c.start_pos > 0:
                pos = torch.arange(c.start_pos + len(c.token_ids))
                table = torch.tensor(c.block_table)
                seg.context_slots = (table[pos // bs] * bs + pos % bs).to(dev)
            prefills.append(seg)
            start = end
        return AttentionMetadata(
            slot_mapping=torch.tensor(slot_list, device=dev),
            num_decodes=len(decodes),
            decode=decode,
            prefills=prefills,
        )
