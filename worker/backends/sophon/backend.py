"""The sophon backend: a compiled bmodel, one weight load, a pool of batch-1 KV slots.

Each slot is a `BmodelSession`: one sequence of at most SEQLEN tokens. The scheduler sees one
KV block of SEQLEN tokens per slot, so the block a request is given *is* its slot; a prompt
is prefilled whole (no chunking), decodes go one token per slot per step. With a bmodel
compiled with host-side logits (`--sample-on-host`) the engine samples, so every sampling
parameter is honoured.

Runtimes: Sophgo's C-model simulator (`sophon_device=sim`), which needs only tpu-mlir. A card
through sophon.sail is not written yet: asking for one is refused with a clear error.
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
from common.errors import ModelConfigError
from worker.backends.base import Backend, BackendCapacity, SequenceChunk, StepResult
from worker.backends.sophon.protocol import BmodelSession
from worker.backends.sophon.settings import SophonSettings
from worker.backends.sophon.simulator import SimulatorRuntime
from worker.checkpoints.bmodel import MANIFEST
from worker.checkpoints.tpu_toolchain import require_toolchain
from worker.model.config import ModelConfig

log = logging.getLogger(__name__)


class SophonBackend(Backend):
    name = "sophon"
    capabilities = Capabilities()

    def __init__(self, model_dir: str | Path, engine: EngineConfig | None = None,
                 settings: SophonSettings | None = None) -> None:
        engine = engine or EngineConfig()
        settings = settings or SophonSettings()
        model_dir = Path(model_dir)
        if not (model_dir / MANIFEST).is_file():
            raise ModelConfigError(
                f"{model_dir} has no {MANIFEST}; compile the model first with "
                "`npuserve model bmodel --model HF_DIR --seqlen N --sample-on-host --out DIR`")
        self.manifest = json.loads((model_dir / MANIFEST).read_text())
        if not self.manifest["sample_on_host"]:
            raise ModelConfigError(
                "this bmodel picks its top-1 token on the chip; serving it is not supported "
                "yet: compile it again with --sample-on-host")
        if settings.sophon_device != "sim":
            raise ModelConfigError(
                f"BM1684X card {settings.sophon_device}: the sophon.sail runtime is not "
                "written yet; use --sophon-device sim (Sophgo's C-model simulator)")
        self.model_config = ModelConfig.from_dir(model_dir)
        venv = Path(settings.tpu_mlir_venv) if settings.tpu_mlir_venv else None
        self.runtime = SimulatorRuntime(model_dir / self.manifest["bmodel"],
                                        require_toolchain(venv))
        pool = min(settings.pool_size, engine.max_num_seqs)
        self.slots = [BmodelSession(self.runtime, self.manifest) for _ in range(pool)]
        seqlen = int(self.manifest["seqlen"])
        self.device = f"bm1684x-sim:{self.manifest['bmodel']}"
        self.capacity = BackendCapacity(
            max_batch=pool, max_seq_len=seqlen,
            # A prompt is prefilled whole, so one step must be able to hold one.
            max_tokens_per_step=max(engine.max_num_batched_tokens, seqlen),
            block_size=seqlen, num_blocks=pool, chunked_prefill=False)
        log.info("sophon backend on the BM1684X simulator: %s, SEQLEN %d, %s, %d slots, "
                 "%.1f MiB of device memory", self.manifest["bmodel"], seqlen,
                 self.manifest["quant"], pool, self.manifest["device_mem_bytes"] / 2**20)

    @property
    def logits_device(self) -> torch.device:
        return torch.device("cpu")

    def execute(self, chunks: Sequence[SequenceChunk]) -> StepResult:
        rows = []
        for chunk in chunks:
            slot = self.slots[chunk.block_table[0]]
            if chunk.start_pos == 0:
                logits = slot.prefill(chunk.token_ids)
            elif len(chunk.token_ids) == 1 and chunk.start_pos == slot.length:
                logits = slot.decode(chunk.token_ids[0])
            else:
                raise ModelConfigError(
                    f"request {chunk.request_id}: a chunk at position {chunk.start_pos} of "
                    f"{len(chunk.token_ids)} tokens does not follow its slot's "
                    f"{slot.length}; the sophon backend does not chunk prefills")
            if chunk.sample:
                rows.append(logits)
        if not rows:
            return StepResult(logits=None)
        return StepResult(logits=torch.from_numpy(np.stack(rows)))

    def weight_bytes(self) -> int:
        return int(self.manifest["device_mem_bytes"])

    def kv_cache_bytes(self) -> int:
        return sum(s.kv_bytes for s in self.slots)

    def close(self) -> None:
        self.runtime.close()
