"""Compiling for the BM1684X with the vendor's own tpu-mlir (make test-bm1684x), from tiny
float32 checkpoints with a 1,024-token vocabulary, so the bfloat16 cast runs too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.worker.conftest import small_vocab_checkpoint
from worker.checkpoints.bmodel import MANIFEST, compile_bmodel, required_nets
from worker.checkpoints.tpu_toolchain import TPU_MLIR_VERSION, require_toolchain

pytestmark = pytest.mark.bm1684x


@pytest.mark.parametrize(("arch", "quant", "layers", "head_dim"), [
    ("qwen2", "bf16", 2, 16), ("qwen3", "w8bf16", 3, 32)])
def test_a_checkpoint_compiles_into_the_protocols_nets_with_a_manifest(
        tmp_path: Path, arch: str, quant: str, layers: int, head_dim: int) -> None:
    source = small_vocab_checkpoint(tmp_path / f"tiny-{arch}", arch)
    out = tmp_path / "bmodel"
    manifest = compile_bmodel(source, out, seqlen=64, quant=quant, sample_on_host=True,
                              toolchain=require_toolchain())
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert (out / manifest["bmodel"]).is_file() and (out / "config.json").is_file()
    assert manifest["tpu_mlir_version"] == TPU_MLIR_VERSION and manifest["seqlen"] == 64
    nets = manifest["nets"]
    assert set(required_nets(layers)) <= set(nets)
    history = {t["name"]: t["shape"] for t in nets["block_cache_0"]["inputs"]}
    assert history["history_k"] == [1, 64, 2, head_dim]  # one slot: the whole sequence
    assert nets["lm_head"]["outputs"][0]["shape"] == [1, 1024]
    assert 0 < manifest["device_mem_bytes"] < 64 << 20
    built = (out / manifest["bmodel"]).stat().st_mtime_ns
    again = compile_bmodel(source, out, seqlen=64, quant=quant, sample_on_host=True,
                           toolchain=require_toolchain())
    assert again == manifest and (out / manifest["bmodel"]).stat().st_mtime_ns == built
