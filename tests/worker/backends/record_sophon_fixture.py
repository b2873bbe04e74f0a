"""Record one real BM1684X simulator run for `make test`'s stand-in runtime.

    NPUSERVE_TPU_MLIR_VENV=.venv-tpu-mlir \
        .venv/bin/python -m tests.worker.backends.record_sophon_fixture

Compiles the tiny small-vocabulary Qwen2 (bf16, SEQLEN 16), drives a prefill and three greedy
decode steps through `BmodelSession` on the simulator, and saves every net call (name, inputs,
outputs) and the bmodel's manifest under data/. Re-run it when the protocol or tpu-mlir
changes: the replaying test then checks the protocol against what the vendor's compiler and
simulator really do, not against a guess.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tests.worker.conftest import small_vocab_checkpoint
from worker.backends.sophon.protocol import BmodelSession, HostRuntime
from worker.backends.sophon.simulator import SimulatorRuntime
from worker.checkpoints.bmodel import compile_bmodel
from worker.checkpoints.tpu_toolchain import require_toolchain

DATA = Path(__file__).parent / "data"
RECORDING = DATA / "sophon_tiny_qwen2_seq16.npz"
MANIFEST = DATA / "sophon_tiny_qwen2_seq16.json"
PROMPT = [5, 77, 301, 12]
DECODES = 3


class Recorder(HostRuntime):
    def __init__(self, runtime: SimulatorRuntime) -> None:
        self.runtime = runtime
        self.arrays: dict[str, np.ndarray] = {}
        self.calls = 0

    def run(self, net: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.runtime.run(net, inputs)
        prefix = f"{self.calls:03d}:{net}"
        for name, value in inputs.items():
            self.arrays[f"{prefix}:in:{name}"] = np.array(value)
        for name, value in outputs.items():
            self.arrays[f"{prefix}:out:{name}"] = np.array(value)
        self.calls += 1
        return outputs


def main() -> None:
    toolchain = require_toolchain()
    with tempfile.TemporaryDirectory() as tmp:
        source = small_vocab_checkpoint(Path(tmp) / "source", "qwen2")
        manifest = compile_bmodel(source, Path(tmp) / "bmodel", seqlen=16, quant="bf16",
                                  sample_on_host=True, toolchain=toolchain)
        runtime = SimulatorRuntime(Path(tmp) / "bmodel" / manifest["bmodel"], toolchain)
        try:
            recorder = Recorder(runtime)
            session = BmodelSession(recorder, manifest)
            tokens = [int(session.prefill(PROMPT).argmax())]
            for _ in range(DECODES):
                tokens.append(int(session.decode(tokens[-1]).argmax()))
        finally:
            runtime.close()
    DATA.mkdir(exist_ok=True)
    np.savez_compressed(RECORDING, **recorder.arrays)
    keep = {k: manifest[k] for k in ("seqlen", "num_layers", "vocab_size", "quant",
                                     "tpu_mlir_version", "nets")}
    MANIFEST.write_text(json.dumps({**keep, "prompt": PROMPT, "tokens": tokens}, indent=1) + "\n")
    print(f"{recorder.calls} net calls, greedy tokens {tokens}: {RECORDING} "
          f"({RECORDING.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
