"""The torch model runner: one model's weights, KV cache and forward pass on one device.

The unit a tensor-parallel rank holds. It turns a step's chunks into tensors and attention
metadata (`prepare`), runs the decoder (`forward`) and the output projection (`logits`). The
backend adapter (`worker.backends.torch_backend`) drives it for the engine; quantization and
verification use it directly to read every position of a text (`prefill_hidden_states`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import ModelConfigError
from common.sampling_params import SamplingParams
from worker.backends import split_step
from worker.backends.base import SequenceChunk
from worker.backends.cpu_threads import ThreadGovernor, cpu_budget
from worker.backends.torch_settings import TorchSettings
from worker.kernels import dispatch
from worker.kernels.cpu import CpuKernels, cpu_kernels
from worker.kernels.cpu_ops import KernelOps, heads_fit, supports
from worker.kernels.decode_plan import BF16_PLAN_ROWS, DecodePlan
from worker.kernels.dispatch_table import DispatchTable, Routable, key_of
from worker.model.attention import AttentionMetadata, KVCache, PrefillSegment
from worker.model.config import ModelConfig
from worker.model.linear import KERNEL_ROWS, Projection
from worker.model.ops import DecoderOps
from worker.model.rope import RotaryEmbedding
from worker.model.sharding import Shard
from worker.model.transformer import compute_logits, forward
from worker.model.weights import ModelWeights, load_weights
from worker.quant.int8_linear import W8A16Projection

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name.startswith("npu"):
        try:
            import torch_npu  # noqa: F401  (registers the "npu" device with torch)
        except Exception as exc:  # ImportError, or the RuntimeError of a CANN-less install
            from worker.doctor import npu_unavailable

            raise ModelConfigError(npu_unavailable(name, exc)) from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelConfigError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def npu_ops() -> DecoderOps:
    """The op set for the Ascend SoC torch_npu reports (imported only for npu devices)."""
    import torch_npu

    from worker.model.npu_ops import npu_ops_for

    return npu_ops_for(torch_npu)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "npu":
        return int(torch.npu.mem_get_info(device)[0])  # type: ignore[attr-defined]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemFree"])


@dataclass(slots=True)
class StepInputs:
    """A step's chunks as the forward pass takes them."""

    ids: torch.Tensor
    """[T] token ids: decodes first, then prefill chunks."""
    positions: torch.Tensor
    """[T]"""
    meta: AttentionMetadata
    sample_rows: list[int]
    """Row of the last token of each chunk with sample=True, in the chunks' order."""


class ModelRunner:
    """Weights, KV cache and forward pass of one model on one device."""

    def __init__(self, model_dir: str | Path, settings: TorchSettings | None = None, *,
                 max_model_len: int | None = None, max_num_seqs: int = 1,
                 shard: Shard | None = None, num_blocks: int | None = None,
                 ops: DecoderOps | None = None) -> None:
        """The KV cache gets settings.kv_cache_gb (or its share of free memory), capped at
        what max_num_seqs sequences of max_model_len tokens can use; `num_blocks` sets it
        instead (tensor-parallel ranks must agree). `shard`: hold one tensor-parallel rank's
        part of the model (then `all_reduce` must be set before the first step). `ops`: the
        op set, chosen by device otherwise (the NPU's on npu; on a CPU where they can run, the
        C kernels', for a float32 model or a bfloat16 one on a CPU without native bfloat16,
        and PyTorch's with the kernels' attention for a bfloat16 model elsewhere; PyTorch's
        otherwise)."""
        settings = settings or TorchSettings()
        self.device = resolve_device(settings.device)
        self.governor: ThreadGovernor | None = None
        """On a CPU without --threads: the thread count following the cores others leave."""
        if settings.threads:
            torch.set_num_threads(settings.threads)
        elif self.device.type == "cpu":
            self.governor = ThreadGovernor(cpu_budget())
        self.settings = settings
        self._second = split_step.SecondThread()
        """The second thread of split steps, while the governor leaves one."""
        full = ModelConfig.from_dir(model_dir)
        self.model_config = cfg = shard.config(full) if shard is not None else full
        """The model as this runner computes it (under tensor parallelism: its rank's heads
        and MLP share)."""
        self.all_reduce: Callable[[torch.Tensor], None] | None = None
        if ops is None and self.device.type == "npu":
            ops = npu_ops()
        self.dtype: torch.dtype = (
            ops.default_dtype if settings.dtype == "auto" and ops is not None
            else getattr(torch, settings.dtype_name(full)))
        """The compute and weight dtype: --dtype's, or auto's (an NPU's op set's by its SoC)."""
        if settings.dtype == "auto":
            log.info("dtype auto: %s for a %s checkpoint on %s",
                     str(self.dtype).removeprefix("torch."),
                     full.torch_dtype, self.device)
        bf16_kernels = self._bf16_kernels(settings, ops)
        # the float32 op set; a bfloat16 model on the CPU has its own (above)
        kernels = (self._kernels(cfg) if settings.cpu_kernels and ops is None
                   and not (self.device.type == "cpu" and self.dtype == torch.bfloat16)
                   else None)
        # a bfloat16 model's attention and one-call decode steps, where its heads fit them
        bf16_attention = bf16_kernels if heads_fit(cfg) is None else None
        # the kernels' op set, float32 activations: a float32 model's or a bfloat16 one's
        op_kernels = kernels or bf16_attention
        self.ops: DecoderOps = ops or (KernelOps(op_kernels) if op_kernels is not None
                                       else DecoderOps())
        self.ops.check_dtype(self.dtype)
        self.activation_dtype = self.ops.activation_dtype or self.dtype
        """The activations' dtype: float32 on the kernels' op set, the model's elsewhere."""
        self.kv_dtype = self._kv_dtype(settings)
        """The KV cache's dtype: the model's, or bfloat16 for a float32 model on the kernels."""
        self.weights: ModelWeights = load_weights(
            model_dir, full, self.dtype, self.device, pack=settings.cpu_packed_weights,
            kernels=kernels or bf16_kernels, shard=shard, device_int8=self.ops.int8_projection,
            norm_dtype=self.activation_dtype)
        max_len = min(cfg.max_position_embeddings, max_model_len or 1 << 30)
        self.rope = RotaryEmbedding(cfg, max_len, self.device, self.activation_dtype)
        block_size = settings.block_size or self.ops.default_block_size
        self.cache: KVCache = self.ops.allocate_kv_cache(
            cfg, num_blocks or self._num_blocks(block_size, max_len, max_num_seqs), block_size,
            self.kv_dtype, self.device)
        self.max_seq_len = min(max_len, self.cache.num_slots)
        """Longest sequence the runner can hold: the context length or the whole cache."""
        route_kernels = kernels or bf16_kernels
        self.dispatch: DispatchTable | None = (
            self._route(route_kernels, attention=op_kernels is not None)
            if route_kernels is not None and settings.cpu_dispatch else None)
        """This machine's GEMM choices per projection shape and row bucket, when timed."""
        step_kernels = kernels or bf16_attention
        # a full batch of decodes, or fewer beside a block of prefill
        plan_rows = min(max_num_seqs + block_size,
                        self._plan_rows() if kernels is not None else BF16_PLAN_ROWS)
        self.plan = (DecodePlan.build(step_kernels, cfg, self.weights, self.cache, self.rope,
                                      plan_rows, self.activation_dtype)
                     if step_kernels is not None and shard is None and plan_rows > 0 else None)
        """The one-call decode step of the CPU kernels, when they run this model, or its
        bfloat16 decode steps (not under tensor parallelism: the step has no place for the
        all-reduces)."""

    def _routable(self, with_lm_head: bool) -> list[Routable]:
        """The projections the dispatch table routes: float32 and bfloat16 ones, and w8a16
        ones with per-channel scales (the kernel alone serves group scales)."""
        w = self.weights
        projs = [p for layer in w.layers for p in (layer.qkv, layer.o_proj, layer.gate_up,
                                                   layer.down)]
        if with_lm_head:
            projs.append(w.lm_head)
        return [p for p in projs
                if isinstance(p, Projection) or (isinstance(p, W8A16Projection) and p.routable)]

    def _route(self, kernels: CpuKernels, attention: bool) -> DispatchTable | None:
        """Time (or read from the cache) this machine's GEMM choices for the model's
        projections and route each by them, and (with `attention`, on the kernels' op set) its
        decode attention's split."""
        projs = self._routable(with_lm_head=True)
        if not projs:
            return None
        cfg = self.model_config
        table = dispatch.tune(kernels, projs, (cfg.num_attention_heads, cfg.num_key_value_heads,
                                               cfg.head_dim) if attention else None)
        for p in projs:
            p.route(table.routes(key_of(p),
                                 isinstance(p, Projection) and p.packed))
        return table

    def _plan_rows(self) -> int:
        """Most decode rows the one-call step covers: the dispatch table's choice for the
        layers' routed shapes, or KERNEL_ROWS (no table, or only group-scaled int8 layers,
        which the kernel alone serves)."""
        shapes = Counter(key_of(p) for p in self._routable(with_lm_head=False))
        if self.dispatch is None or not shapes:
            return KERNEL_ROWS
        return self.dispatch.plan_rows(shapes)

    def _bf16_kernels(self, settings: TorchSettings, ops: DecoderOps | None
                      ) -> CpuKernels | None:
        """The compiled kernels for a bfloat16 model on the CPU: its projections' kernel, its
        op set (KernelOps, float32 activations, where its heads fit the kernels' attention)
        and its decode steps of up to BF16_PLAN_ROWS rows (in one call, as float32's)."""
        if (settings.cpu_kernels and ops is None and self.device.type == "cpu"
                and self.dtype == torch.bfloat16):
            return cpu_kernels()
        return None

    def _kernels(self, cfg: ModelConfig) -> CpuKernels | None:
        """The compiled CPU kernels, if they can run this model here."""
        reason = supports(cfg, self.device, self.dtype)
        if reason is not None:
            if self.device.type == "cpu":
                log.info("CPU kernels not used: %s", reason)
            return None
        return cpu_kernels()

    def _kv_dtype(self, settings: TorchSettings) -> torch.dtype:
        """bfloat16 where --kv-cache-dtype asks for it and the ops can store and read it (the
        CPU kernels widen it as they read); the model's dtype otherwise."""
        if settings.kv_cache_dtype == "auto" or self.dtype == torch.bfloat16:
            return self.dtype
        if not isinstance(self.ops, KernelOps):
            raise ModelConfigError(
                f"--kv-cache-dtype {settings.kv_cache_dtype} needs a float32 model on the CPU "
                f"kernels (this one is {str(self.dtype).removeprefix('torch.')} on "
                f"{self.device} with {self.ops.name} ops): leave it auto")
        return torch.bfloat16

    def _num_blocks(self, block_size: int, max_len: int, max_num_seqs: int) -> int:
        per_block = self.ops.kv_cache_bytes_per_block(self.model_config, block_size,
                                                      self.kv_dtype)
        if self.settings.kv_cache_gb is not None:
            budget = int(self.settings.kv_cache_gb * (1 << 30))
        else:
            budget = int(free_memory_bytes(self.device) * self.settings.kv_cache_fraction)
        # More blocks than max_num_seqs full-length sequences can use would only hold memory.
        num_blocks = min(budget // per_block, max_num_seqs * -(-max_len // block_size))
        if num_blocks < 1:
            raise ModelConfigError(
                f"KV cache budget of {budget} bytes holds no block of {per_block} bytes; "
                "raise --kv-cache-gb"
            )
        return num_blocks

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads."""
        return self.weights.nbytes_per_decode_step()

    def weight_memory_bytes(self) -> int:
        """Bytes the weights hold, packed copies included."""
        return self.weights.resident_bytes()

    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes

    def prepare(self, chunks: Sequence[SequenceChunk]) -> StepInputs:
        """Lay the chunks out decodes first (attended as one padded batch), prefill chunks
        after (one by one), with the cache slot of every token and each chunk's context."""
        order = sorted(range(len(chunks)), key=lambda i: not chunks[i].is_decode)
        ordered = [chunks[i] for i in order]
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_at: dict[int, int] = {}  # chunk index -> row of its last token
        for i, c in zip(order, ordered, strict=True):
            for p in range(c.start_pos, c.start_pos + len(c.token_ids)):
                slots.append(c.block_table[p // bs] * bs + p % bs)
            positions.extend(range(c.start_pos, c.start_pos + len(c.token_ids)))
            ids.extend(c.token_ids)
            if c.sample:
                sample_at[i] = len(ids) - 1
        dev = self.device
        return StepInputs(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                          self._metadata(ordered, slots),
                          [sample_at[i] for i in range(len(chunks)) if i in sample_at])

    def _metadata(self, ordered: list[SequenceChunk], slots: list[int]) -> AttentionMetadata:
        if (self.plan is not None and len(slots) <= self.plan.max_rows
                and not all(c.is_decode for c in ordered)):
            return self._rows_metadata(ordered, slots)
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
            context = (self.ops.prefill_context(c.block_table, c.start_pos + len(c.token_ids),
                                                self.cache)
                       if c.start_pos > 0 else None)
            prefills.append(PrefillSegment(start, end, context))
            start = end
        return AttentionMetadata(slot_mapping=torch.tensor(slots, device=self.device),
                                 num_decodes=len(decodes), decode=decode, prefills=prefills)

    def _rows_metadata(self, ordered: list[SequenceChunk], slots: list[int]
                       ) -> AttentionMetadata:
        """A step of few tokens, prefill chunks among them, for the one-call step: every token
        a row of its own that attends to its sequence up to itself, as a decode does (its
        chunk's keys and values are stored before any row attends). A short prefill chunk
        beside decodes then costs the step little more than its rows, where the per-operator
        path would run the decodes too."""
        tables = [c.block_table for c in ordered for _ in c.token_ids]
        width = max(len(t) for t in tables)
        lens = [p + 1 for c in ordered for p in range(c.start_pos, c.start_pos + len(c.token_ids))]
        decode = self.ops.decode_metadata(
            torch.tensor([t + [0] * (width - len(t)) for t in tables]), torch.tensor(lens),
            self.cache)
        return AttentionMetadata(slot_mapping=torch.tensor(slots, device=self.device),
                                 num_decodes=len(slots), decode=decode, prefills=[])

    def forward(self, ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """ids, positions [T] -> final hidden states [T, hidden]; the cache is updated."""
        if self.plan is not None and self.plan.covers(meta):
            return self.plan.forward(ids, positions, meta)
        return forward(self.model_config, self.weights, self.rope, ids, positions, self.cache,
                       meta, self.ops, self.all_reduce)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] -> float32 logits [n, vocab], on the runner's device."""
        return compute_logits(self.weights, hidden)

    @torch.inference_mode()
    def execute(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor | None:
        """One step -> logits [n, vocab] of the chunks with sample=True (None if there are none)."""
        if self.governor is not None:
            self.governor.maybe_adjust()
        groups = self._split(chunks)
        if groups is not None:
            return self._execute_split(chunks, *groups)
        step = self.prepare(chunks)
        hidden = self.forward(step.ids, step.positions, step.meta)
        if not step.sample_rows:
            return None
        return self.logits(hidden[torch.tensor(step.sample_rows, device=self.device)])

    def _split(self, chunks: Sequence[SequenceChunk]) -> tuple[list[int], list[int]] | None:
        """The step's two halves when the governor has left one thread of two or more and the
        step prefills enough prompts (the second half never takes the one-call step, whose
        scratch the first may be using; not under tensor parallelism, whose ranks follow
        one forward pass at a time)."""
        g = self.governor
        if (g is None or g.threads != 1 or g.budget < 2 or self.all_reduce is not None
                or not self.settings.cpu_split_steps):
            return None
        rows = self.plan.max_rows + 1 if self.plan is not None else 0
        return split_step.split(chunks, max(split_step.MIN_GROUP_TOKENS, rows))

    def _execute_split(self, chunks: Sequence[SequenceChunk], first: list[int],
                       second: list[int]) -> torch.Tensor | None:
        """The two halves at once, the second on its own thread -> the logits of the chunks
        with sample=True, in the chunks' order, as execute returns them."""
        halves = (first, second)
        steps = [self.prepare([chunks[i] for i in half]) for half in halves]
        pending = self._second.executor().submit(self._forward_alone, steps[1])
        try:
            mine = self.forward(steps[0].ids, steps[0].positions, steps[0].meta)
        finally:
            theirs = pending.result()  # never leave the other half writing the cache
        hidden = (mine, theirs)
        where: dict[int, tuple[int, int]] = {}
        for h, (half, step) in enumerate(zip(halves, steps, strict=True)):
            sampled = [i for i in half if chunks[i].sample]
            where.update(zip(sampled, ((h, r) for r in step.sample_rows), strict=True))
        if not where:
            return None
        rows = (where[i] for i in sorted(where))
        return self.logits(torch.stack([hidden[h][r] for h, r in rows]))

    @torch.inference_mode()
    def _forward_alone(self, step: StepInputs) -> torch.Tensor:
        """A split step's second half, on the second thread with one OpenMP thread (as the
        engine's: the governor set one)."""
        torch.set_num_threads(1)
        return self.forward(step.ids, step.positions, step.meta)

    def close(self) -> None:
        """Stops the second thread of split steps (a tensor-parallel group also has ranks)."""
        self._second.close()

    @torch.inference_mode()
    def prefill_hidden_states(self, ids: Sequence[int]) -> torch.Tensor:
        """Prefill `ids` as one fresh sequence in the cache's first blocks -> the final
        hidden state of every position [T, hidden] (what teacher-forced passes read)."""
        t = len(ids)
        if t > self.max_seq_len:
            raise ValueError(f"text of {t} tokens is longer than the {self.max_seq_len} "
                             "this runner was sized for")
        table = list(range(-(-t // self.block_size)))
        step = self.prepare([SequenceChunk("", list(ids), 0, table, True, SamplingParams())])
        return self.forward(step.ids, step.positions, step.meta)
