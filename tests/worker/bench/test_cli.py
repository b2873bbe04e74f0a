"""`npuserve bench engine`: which model flags go together, and a decode-only run of a shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.cli import main


@pytest.mark.parametrize(("flags", "message"), [
    ([], "exactly one of --model DIR (a checkpoint) and --shape NAME"),
    (["--model", "m", "--shape", "qwen3-tiny"], "exactly one of --model"),
    (["--model", "m", "--shape-dir", "d"], "--shape-dir goes with --shape"),
    (["--model", "m", "--decode-only", "--contention"], "not --contention"),
    (["--model", "m", "--decode-only", "--requests", "4"], "drop --requests"),
])
def test_model_and_mode_flags_that_do_not_go_together_exit_2_saying_why(
        flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "engine", *flags]) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_shape_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "engine", "--shape", "qwen3-8b"])
    assert exit_.value.code == 2
    assert "qwen3-1.7b" in capsys.readouterr().err


def test_decode_only_on_a_shape_with_its_w8a16_copy_reports_both_against_their_floors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert main(["bench", "engine", "--shape", "qwen3-tiny", "--shape-dir", str(tmp_path),
                 "--decode-only", "--quantized", "auto", "--quick", "--max-batch", "4",
                 "--kv-cache-gb", "0.02", "--json", str(out)]) == 0
    assert (tmp_path / "qwen3-tiny-w8a16" / "config.json").is_file()
    r = json.loads(out.read_text())
    assert r["decode_only"] and r["model"] == "qwen3-tiny" and r["max_batch"] == 4
    assert list(r["decode_tokens_per_s_by_batch"]) == ["1", "2", "4"]
    assert r["decode_vs_floor"] == pytest.approx(
        r["decode_ms_per_token_batch1"] / r["bandwidth_floor_ms_per_token"])
    # the round of decode and its own copy bandwidth closest to the floor
    rounds = list(zip(r["decode_ms_per_token_batch1_samples"], r["bandwidth_gb_s_samples"],
                      strict=True))
    assert len(rounds) == 3
    assert (r["decode_ms_per_token_batch1"], r["bandwidth_gb_s"]) == min(
        rounds, key=lambda dg: dg[0] * dg[1])
    assert r["quantized_model"] == "qwen3-tiny-w8a16"
    # the quantized round closest to its own floor, each after its own copy bandwidth
    quantized = list(zip(r["quantized_decode_ms_rounds"], r["quantized_bandwidth_gb_s_rounds"],
                         strict=True))
    assert (r["quantized_floor_round_decode_ms"], r["quantized_bandwidth_gb_s"]) == min(
        quantized, key=lambda dg: dg[0] * dg[1])
    assert r["quantized_bandwidth_floor_ms_per_token"] == pytest.approx(
        r["quantized_weight_bytes_per_decode_step"] / r["quantized_bandwidth_gb_s"] / 1e6)
    assert r["quantized_decode_vs_floor"] == pytest.approx(
        r["quantized_floor_round_decode_ms"] / r["quantized_bandwidth_floor_ms_per_token"])
    assert r["quantized_weight_bytes_per_decode_step"] < r["weight_bytes_per_decode_step"]
    assert not any(key.startswith("hf_") for key in r)
    table = capsys.readouterr().out
    assert "qwen3-tiny: decode only, batches up to 4" in table
    assert "qwen3-tiny-w8a16 floor" in table and "decode by batch size" in table
