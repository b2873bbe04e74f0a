"""The bmodel manifest, from `model_tool --info` output recorded from a real tpu-mlir compile
(tiny Qwen2, 2 layers, 1,024-token vocabulary, bf16, SEQLEN 64, --do_sample), and the
toolchain's set-up steps that need no network."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ModelConfigError
from worker.checkpoints.bmodel import check_nets, parse_model_info, required_nets
from worker.checkpoints.tpu_toolchain import (
    BUNDLED_SYSTEM_LIBS,
    STAMP,
    TPU_MLIR_VERSION,
    is_ready,
    move_bundled_system_libs,
    require_toolchain,
)

INFO = (Path(__file__).parent / "data" / "bm1684x_tiny_qwen2_bf16_seq64_info.txt").read_text()
CONFIG = {"num_hidden_layers": 2, "vocab_size": 1024}


def test_every_net_of_the_vendor_protocol_is_parsed_with_its_tensors() -> None:
    info = parse_model_info(INFO)
    assert set(info.nets) == {*required_nets(2), "greedy_head", "sample_head"}
    cache = info.nets["block_cache_0"]
    assert [(t.name, t.shape, t.dtype) for t in cache.inputs] == [
        ("input_states", (1, 1, 64), "bfloat16"), ("position_ids", (1, 1), "int32"),
        ("attention_mask", (1, 1, 1, 65), "bfloat16"), ("history_k", (1, 64, 2, 16), "bfloat16"),
        ("history_v", (1, 64, 2, 16), "bfloat16")]
    assert [t.name for t in cache.outputs] == ["output_states", "k_cache", "v_cache"]
    assert info.nets["sample_head"].dynamic and not info.nets["block_0"].dynamic
    assert info.nets["lm_head"].outputs[0].shape == (1, 1024)
    assert info.device_mem_bytes == 603208


def test_the_layout_check_accepts_the_real_bmodel_and_names_what_is_missing() -> None:
    info = parse_model_info(INFO)
    check_nets(info, CONFIG, seqlen=64, sample_on_host=True)
    with pytest.raises(ModelConfigError, match="lacks nets block_2, block_cache_2"):
        check_nets(info, {**CONFIG, "num_hidden_layers": 3}, seqlen=64, sample_on_host=True)
    with pytest.raises(ModelConfigError, match=r"embedding takes \(1, 64\), not \[1, 128\]"):
        check_nets(info, CONFIG, seqlen=128, sample_on_host=True)
    with pytest.raises(ModelConfigError, match="not logits over 2048 tokens"):
        check_nets(info, {**CONFIG, "vocab_size": 2048}, seqlen=64, sample_on_host=True)


def test_the_bundled_system_libraries_are_moved_aside_once(tmp_path: Path) -> None:
    third_party = tmp_path / "lib/python3.10/site-packages/tpu_mlir/lib/third_party"
    third_party.mkdir(parents=True)
    for name in (*BUNDLED_SYSTEM_LIBS, "libdnnl.so.3"):
        (third_party / name).write_text(name)
    moved = move_bundled_system_libs(tmp_path)
    assert sorted(p.name for p in moved) == sorted(BUNDLED_SYSTEM_LIBS)
    assert [p.name for p in third_party.iterdir()] == ["libdnnl.so.3"]
    assert move_bundled_system_libs(tmp_path) == []


def test_a_missing_toolchain_is_an_error_that_says_how_to_set_it_up(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="npuserve model tpu-toolchain --venv"):
        require_toolchain(tmp_path)
    (tmp_path / STAMP).write_text("0.0.1\n")
    assert not is_ready(tmp_path)
    (tmp_path / STAMP).write_text(TPU_MLIR_VERSION + "\n")
    assert require_toolchain(tmp_path).venv == tmp_path
