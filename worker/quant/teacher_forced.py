"""A model's logits at every position of a text: what `npuserve verify` compares.

Two kinds of model give them: a checkpoint through the torch backend's runner (one prefill,
then the logits of every row), and a compiled BM1684X bmodel on Sophgo's simulator (the text
prefilled one token, then fed a token at a time through the decode nets, as serving does).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from worker.quant.runner import load_runner

LOGIT_ROWS = 256
"""Positions whose logits are produced at once: bounds memory at rows x vocab floats."""


class TeacherForced(Protocol):
    vocab_size: int
    max_seq_len: int
    quantization: dict[str, Any] | None
    """How the model was made smaller (npuserve's int8 settings, or a bmodel's), or None."""

    def logit_rows(self, ids: list[int]) -> Iterator[torch.Tensor]:
        """Logits [rows, V] of positions 0..len(ids)-1, LOGIT_ROWS at a time, on the CPU."""
        ...

    def close(self) -> None:
        """Release what the model holds outside this process."""
        ...


class CheckpointLogits:
    """A Hugging Face or npuserve int8 checkpoint, through the torch backend's runner."""

    def __init__(self, model_dir: str | Path, max_tokens: int, *, device: str = "cpu",
                 threads: int | None = None) -> None:
        self.runner = load_runner(model_dir, max_tokens, device=device, threads=threads)
        cfg = self.runner.model_config
        self.vocab_size, self.max_seq_len = cfg.vocab_size, self.runner.max_seq_len
        self.quantization: dict[str, Any] | None = (
            cfg.quantization.to_dict() if cfg.quantization else None)

    def logit_rows(self, ids: list[int]) -> Iterator[torch.Tensor]:
        hidden = self.runner.prefill_hidden_states(ids)  # [T, hidden]
        for start in range(0, len(ids), LOGIT_ROWS):
            yield self.runner.logits(hidden[start:start + LOGIT_ROWS]).cpu()

    def close(self) -> None:
        """Nothing outside this process."""


class BmodelLogits:
    """A bmodel compiled with --sample-on-host, on the BM1684X C-model simulator."""

    def __init__(self, model_dir: Path, venv: Path | None = None) -> None:
        import json

        from worker.backends.sophon.protocol import BmodelSession
        from worker.backends.sophon.simulator import SimulatorRuntime
        from worker.checkpoints.bmodel import MANIFEST
        from worker.checkpoints.tpu_toolchain import require_toolchain

        manifest = json.loads((model_dir / MANIFEST).read_text())
        self.runtime = SimulatorRuntime(model_dir / manifest["bmodel"], require_toolchain(venv))
        self.session = BmodelSession(self.runtime, manifest)
        self.vocab_size = int(manifest["vocab_size"])
        self.max_seq_len = int(manifest["seqlen"])
        self.quantization: dict[str, Any] | None = {
            "bmodel": manifest["quant"], "chip": manifest["chip"], "seqlen": self.max_seq_len}

    def logit_rows(self, ids: list[int]) -> Iterator[torch.Tensor]:
        rows = [torch.from_numpy(self.session.prefill(ids[:1]))]
        for token in ids[1:]:
            rows.append(torch.from_numpy(self.session.decode(token)))
            if len(rows) == LOGIT_ROWS:
                yield torch.stack(rows)
                rows = []
        if rows:
            yield torch.stack(rows)

    def close(self) -> None:
        self.runtime.close()


def open_model(model_dir: str | Path, max_tokens: int, *, device: str = "cpu",
               threads: int | None = None) -> CheckpointLogits | BmodelLogits:
    """A compiled bmodel directory on the simulator, else a checkpoint on `device`."""
    from worker.checkpoints.bmodel import MANIFEST

    if (Path(model_dir) / MANIFEST).is_file():
        return BmodelLogits(Path(model_dir))
    return CheckpointLogits(model_dir, max_tokens, device=device, threads=threads)
