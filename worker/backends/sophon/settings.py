"""The sophon backend's own settings. Kept apart from the backend so the CLI can list them
without importing numpy or a vendor runtime."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class SophonSettings:
    """How the sophon backend runs one compiled bmodel (`npuserve model bmodel`)."""

    sophon_device: str = "sim"
    """sim: Sophgo's BM1684X C-model simulator from tpu-mlir (no card needed); a card index
    (0, 1, ...) for a BM1684X through sophon.sail."""
    pool_size: int = 2
    """KV slots sharing one weight load: sequences this worker runs at once, one each."""
    tpu_mlir_venv: str | None = None
    """The tpu-mlir toolchain the simulator runs in; unset: NPUSERVE_TPU_MLIR_VENV, else
    ~/.cache/npuserve/tpu-mlir-<version>."""

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise InvalidRequestError("pool_size", "must be >= 1")
        if self.sophon_device != "sim" and not self.sophon_device.isdigit():
            raise InvalidRequestError("sophon_device", "must be sim or a card index (0, 1, ...)")
