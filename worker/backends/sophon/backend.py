"""The sophon backend: a compiled bmodel, one weight load, a pool of KV slots.

Each slot holds one sequence of at most SEQLEN tokens. The scheduler sees one KV block of
SEQLEN tokens per slot, so the block a request is given *is* its slot; a prompt is prefilled
whole (no chunking), never after cached context, so the capacity leaves prefix caching off
whatever EngineConfig asks. Slots come in groups of the decode nets' batch B (`SlotGroup`): a
step decodes every running slot of a group in one net call per layer, so a bmodel compiled
with `--decode-batch B` reads its weights once for B sequences where Sophgo's demos read
them once per sequence.

Sampling: a bmodel compiled with host-side logits (`--sample-on-host`) hands the engine
logits, so every sampling parameter is honoured. One compiled without it picks its top-1
token on the chip (lm_head ends in an argmax): the backend returns token ids and declares
that it honours greedy decoding only, so requests asking for anything else are refused with
INVALID_ARGUMENT (by the gateway, from the worker's registration, and by the engine).

Runtimes: a BM1684X card through sophon.sail (`sophon_device=N`; KV slots in device memory)
or Sophgo's C-model simulator from tpu-mlir (`sophon_device=sim`). A device call that fails
resets its slot only; the engine hands the request back (see WorkerService).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.capabilities import Capabilities
from common.config import EngineConfig
from common.errors import DeviceError, ModelConfigError
from worker.backends.base import (
    Backend,
    BackendCapacity,
    DeviceStats,
    OutputKind,
    SequenceChunk,
    StepResult,
)
from worker.backends.sophon.protocol import Runtime, SlotGroup
from worker.backends.sophon.settings import SophonSettings
from worker.checkpoints.bmodel import MANIFEST
from worker.model.config import ModelConfig

log = logging.getLogger(__name__)


GREEDY_ONLY = Capabilities(frozenset({"stop_token_ids", "ignore_eos"}))
"""What a bmodel with the on-chip top-1 head honours: greedy decoding (temperature 0) and the
engine's own stopping rules; every other sampling field is refused."""


class SophonBackend(Backend):
    name = "sophon"

    def __init__(self, model_dir: str | Path, engine: EngineConfig | None = None,
                 settings: SophonSettings | None = None, runtime: Runtime | None = None
                 ) -> None:
        engine = engine or EngineConfig()
        settings = settings or SophonSettings()
        model_dir = Path(model_dir)
        if not (model_dir / MANIFEST).is_file():
            raise ModelConfigError(
                f"{model_dir} has no {MANIFEST}; compile the model first with "
                "`npuserve model bmodel --model HF_DIR --seqlen N --out DIR`")
        self.manifest = json.loads((model_dir / MANIFEST).read_text())
        self.model_config = ModelConfig.from_dir(model_dir)
        self.on_chip_head = not self.manifest["sample_on_host"]
        self.capabilities = GREEDY_ONLY if self.on_chip_head else Capabilities()
        bmodel = model_dir / self.manifest["bmodel"]
        self.runtime = runtime or _open_runtime(bmodel, settings)
        wanted = min(settings.pool_size, engine.max_num_seqs)
        first = SlotGroup(self.runtime, self.manifest)
        self.groups = [first] + [SlotGroup(self.runtime, self.manifest)
                                 for _ in range(-(-wanted // first.batch) - 1)]
        pool = len(self.groups) * first.batch
        if pool != wanted:
            log.info("pool of %d slots rounded up to %d: the decode nets step %d at a time",
                     wanted, pool, first.batch)
        self.slots = [(g, i) for g in self.groups for i in range(g.batch)]
        """Slot (= KV block) index -> its group and its place in the group."""
        seqlen = int(self.manifest["seqlen"])
        self.device = (f"bm1684x-sim:{bmodel.name}" if settings.sophon_device == "sim"
                       else f"bm1684x:{settings.sophon_device}")
        self.capacity = BackendCapacity(
            max_batch=pool, max_seq_len=seqlen,
            # A prompt is prefilled whole, so one step must be able to hold one.
            max_tokens_per_step=max(engine.max_num_batched_tokens, seqlen),
            block_size=seqlen, num_blocks=pool, chunked_prefill=False,
            output=OutputKind.TOKENS if self.on_chip_head else OutputKind.LOGITS)
        if engine.enable_prefix_caching:
            log.info("prefix caching off: each request prefills its own static KV slot")
        log.info("sophon backend on %s: SEQLEN %d, %s, %s, %d slots, %.1f MiB of device "
                 "memory; decode batch %d", self.device, seqlen, self.manifest["quant"],
                 "top-1 on chip (greedy only)" if self.on_chip_head else "logits to the host",
                 pool, self.manifest["device_mem_bytes"] / 2**20, first.batch)

    @property
    def logits_device(self) -> torch.device:
        return torch.device("cpu")

    def execute(self, chunks: Sequence[SequenceChunk]) -> StepResult:
        outputs: dict[str, np.ndarray] = {}
        failed: dict[str, str] = {}
        decodes: dict[int, dict[int, tuple[str, int]]] = {}
        """group index -> {place in the group: (request id, token)}"""
        for chunk in chunks:
            group, place = self.slots[chunk.block_table[0]]
            if chunk.start_pos == 0:
                try:
                    outputs[chunk.request_id] = group.prefill(place, chunk.token_ids)
                except DeviceError as exc:
                    group.reset(place)
                    failed[chunk.request_id] = str(exc)
            elif len(chunk.token_ids) == 1 and chunk.start_pos == group.lengths[place]:
                decodes.setdefault(chunk.block_table[0] // group.batch, {})[place] = (
                    chunk.request_id, chunk.token_ids[0])
            else:
                raise ModelConfigError(
                    f"request {chunk.request_id}: a chunk at position {chunk.start_pos} of "
                    f"{len(chunk.token_ids)} tokens does not follow its slot's "
                    f"{group.lengths[place]}; the sophon backend does not chunk prefills")
        for index, members in decodes.items():
            group = self.groups[index]
            try:
                rows = group.decode({place: token for place, (_, token) in members.items()})
            except DeviceError as exc:  # one call for the whole group: every member failed
                for place, (rid, _) in members.items():
                    group.reset(place)
                    failed[rid] = str(exc)
                continue
            outputs.update({rid: rows[place] for place, (rid, _) in members.items()})
        rows_in_order = [outputs[c.request_id] for c in chunks
                         if c.sample and c.request_id in outputs]
        if self.on_chip_head:
            return StepResult(token_ids=[int(r[0]) for r in rows_in_order], failed=failed)
        return StepResult(
            logits=torch.from_numpy(np.stack(rows_in_order)) if rows_in_order else None,
            failed=failed)

    def weight_bytes(self) -> int:
        return int(self.manifest["device_mem_bytes"])

    def kv_cache_bytes(self) -> int:
        return sum(g.kv_bytes for g in self.groups)

    def device_stats(self) -> DeviceStats | None:
        return self.runtime.device_stats()

    def close(self) -> None:
        self.runtime.close()


def _open_runtime(bmodel: Path, settings: SophonSettings) -> Runtime:
    """The simulator (in tpu-mlir's Python) or a card (sophon.sail), as settings say."""
    if settings.sophon_device == "sim":
        from worker.backends.sophon.simulator import SimulatorRuntime
        from worker.checkpoints.tpu_toolchain import require_toolchain

        venv = Path(settings.tpu_mlir_venv) if settings.tpu_mlir_venv else None
        return SimulatorRuntime(bmodel, require_toolchain(venv))
    from worker.backends.sophon.card import SailRuntime

    return SailRuntime(str(bmodel), int(settings.sophon_device))
