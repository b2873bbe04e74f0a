"""`npuserve model ...` builds once, skips a complete output, and rebuilds on --force."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.cli import build_parser, main


def test_tokenizer_command_builds_then_skips_then_rebuilds_with_force(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "tok"
    caplog.set_level(logging.INFO)
    assert main(["model", "tokenizer", str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    built_at = (out / "tokenizer.json").stat().st_mtime_ns

    assert main(["model", "tokenizer", str(out)]) == 0
    assert "already in" in caplog.text and "--force" in caplog.text
    assert (out / "tokenizer.json").stat().st_mtime_ns == built_at

    (out / "tokenizer.json").write_text("stale")
    assert main(["model", "tokenizer", str(out), "--force"]) == 0
    assert (out / "tokenizer.json").read_text().startswith("{")


def test_tiny_command_takes_arch_and_seed() -> None:
    args = build_parser().parse_args(["model", "tiny", "out", "--arch", "llama", "--seed", "3"])
    assert (args.arch, args.seed, args.out, args.force) == ("llama", 3, Path("out"), False)
    assert callable(args.handler)


def test_unknown_tiny_arch_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["model", "tiny", "out", "--arch", "mistral"])
    assert info.value.code == 2
    assert "invalid choice: 'mistral'" in capsys.readouterr().err
