"""The sophon backend: a compiled bmodel, one weight load, a pool of batch-1 KV slots.

Each slot is a `BmodelSession`: one sequence of at most SEQLEN tokens. The scheduler sees one
KV block of SEQLEN tokens per slot, so the block a request is given *is* its slot; a prompt
is prefilled whole (no chunking), decodes go one token per slot per step.

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
from worker.backends.sophon.protocol import BmodelSession, Runtime
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
        where = ("the BM1684X simulator" if settings.sophon_device == "sim"
                 else f"BM1684X card {settings.sophon_device}")
        pool = min(settings.pool_size, engine.max_num_seqs)
        self.slots = [BmodelSession(self.runtime, self.manifest) for _ in range(pool)]
        seqlen = int(self.manifest["seqlen"])
        self.device = (f"bm1684x-sim:{bmodel.name}" if settings.sophon_device == "sim"
                       else f"bm1684x:{settings.sophon_device}")
        self.capacity = BackendCapacity(
            max_batch=pool, max_seq_len=seqlen,
            # A prompt is prefilled whole, so one step must be able to hold one.
            max_tokens_per_step=max(engine.max_num_batched_tokens, seqlen),
            block_size=seqlen, num_blocks=pool, chunked_prefill=False,
            output=OutputKind.TOKENS if self.on_chip_head else OutputKind.LOGITS)
        log.info("sophon backend on %s: %s, SEQLEN %d, %s, %s, %d slots, %.1f MiB of device "
                 "memory", where, bmodel.name, seqlen, self.manifest["quant"],
                 "top-1 on chip (greedy only)" if self.on_chip_head else "logits to the host",
                 pool, self.manifest["device_mem_bytes"] / 2**20)

    @property
    def logits_device(self) -> torch.device:
        return torch.device("cpu")

    def execute(self, chunks: Sequence[SequenceChunk]) -> StepResult:
        rows: list[np.ndarray] = []
        failed: dict[str, str] = {}
        for chunk in chunks:
            slot = self.slots[chunk.block_table[0]]
            try:
                out = self._run(slot, chunk)
            except DeviceError as exc:
                slot.reset()
                failed[chunk.request_id] = str(exc)
                continue
            if chunk.sample:
                rows.append(out)
        if self.on_chip_head:
            return StepResult(token_ids=[int(r[0]) for r in rows], failed=failed)
        return StepResult(logits=torch.from_numpy(np.stack(rows)) if rows else None,
                          failed=failed)

    def weight_bytes(self) -> int:
        return int(self.manifest["device_mem_bytes"])

    def kv_cache_bytes(self) -> int:
        return sum(s.kv_bytes for s in self.slots)

    def device_stats(self) -> DeviceStats | None:
        return self.runtime.device_stats()

    def close(self) -> None:
        self.runtime.close()

    @staticmethod
    def _run(slot: BmodelSession, chunk: SequenceChunk) -> np.ndarray:
        if chunk.start_pos == 0:
            return slot.prefill(chunk.token_ids)
        if len(chunk.token_ids) == 1 and chunk.start_pos == slot.length:
            return slot.decode(chunk.token_ids[0])
        raise ModelConfigError(
            f"request {chunk.request_id}: a chunk at position {chunk.start_pos} of "
            f"{len(chunk.token_ids)} tokens does not follow its slot's {slot.length}; the "
            "sophon backend does not chunk prefills")


def _open_runtime(bmodel: Path, settings: SophonSettings) -> Runtime:
    """The simulator (in tpu-mlir's Python) or a card (sophon.sail), as settings say."""
    if settings.sophon_device == "sim":
        from worker.backends.sophon.simulator import SimulatorRuntime
        from worker.checkpoints.tpu_toolchain import require_toolchain

        venv = Path(settings.tpu_mlir_venv) if settings.tpu_mlir_venv else None
        return SimulatorRuntime(bmodel, require_toolchain(venv))
    from worker.backends.sophon.card import SailRuntime

    return SailRuntime(str(bmodel), int(settings.sophon_device))
