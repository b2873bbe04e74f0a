"""Flags derived from settings dataclasses: names, NPUSERVE_* defaults, help, types."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from common.config import FLAG, NO_FLAG, setting
from common.errors import InvalidRequestError
from common.flags import add_flags, env_names, field_docs, from_args


@dataclass(frozen=True, slots=True)
class Inner:
    depth: int = 3
    """How deep."""


@dataclass(frozen=True, slots=True)
class Example:
    path: str = field(metadata={FLAG: "--dir"})
    """Where it lives (100% of it)."""
    count: int = 2
    """How many."""
    ratio: float = setting(0.5, flag="--share", env="SHARE_OF_IT")
    """A share."""
    limit: int | None = None
    """Optional cap; unset means none."""
    fast: bool = True
    """Go fast."""
    mode: str = setting("a", choices=("a", "b"))
    """One of a or b."""
    inner: Inner = Inner()
    hidden: object = field(default=None, metadata={NO_FLAG: True})


def parse(argv: list[str], defaults: Example | None = None) -> Example:
    parser = argparse.ArgumentParser()
    add_flags(parser, Example, defaults)
    return from_args(Example, parser.parse_args(argv))


def test_fields_become_flags_with_their_defaults() -> None:
    assert parse(["--dir", "x"]) == Example(path="x")


def test_flags_set_fields_of_every_type_and_of_nested_settings() -> None:
    got = parse(["--dir", "x", "--count", "5", "--share", "0.25", "--limit", "9", "--no-fast",
                 "--mode", "b", "--depth", "1"])
    assert got == Example("x", 5, 0.25, 9, False, "b", Inner(1))


def test_the_environment_sets_defaults_and_flags_override_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPUSERVE_PATH", "/from/env")
    monkeypatch.setenv("NPUSERVE_COUNT", "7")
    monkeypatch.setenv("NPUSERVE_SHARE_OF_IT", "0.75")
    monkeypatch.setenv("NPUSERVE_LIMIT", "4")
    monkeypatch.setenv("NPUSERVE_FAST", "off")
    monkeypatch.setenv("NPUSERVE_DEPTH", "8")
    assert parse([]) == Example("/from/env", 7, 0.75, 4, False, "a", Inner(8))
    assert parse(["--count", "1", "--fast", "--limit", ""]) == Example(
        "/from/env", 1, 0.75, None, True, "a", Inner(8))


def test_an_empty_variable_leaves_an_optional_field_unset(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPUSERVE_LIMIT", "")
    assert parse(["--dir", "x"]).limit is None


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("TRUE", True), ("yes", True),
                                            ("0", False), ("false", False), ("no", False)])
def test_boolean_variables_read_the_usual_spellings(
        monkeypatch: pytest.MonkeyPatch, raw: str, value: bool) -> None:
    monkeypatch.setenv("NPUSERVE_FAST", raw)
    assert parse(["--dir", "x"]).fast is value


def test_an_unreadable_boolean_variable_is_refused_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPUSERVE_FAST", "maybe")
    with pytest.raises(InvalidRequestError, match="NPUSERVE_FAST"):
        parse(["--dir", "x"])


def test_a_field_without_default_is_required_unless_its_variable_is_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        parse([])
    monkeypatch.setenv("NPUSERVE_PATH", "p")
    assert parse([]).path == "p"


def test_a_bad_value_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--dir", "x", "--count", "many"])
    assert "invalid int value: 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--dir", "x", "--mode", "c"])


def test_defaults_can_come_from_an_instance() -> None:
    assert parse(["--dir", "y"], Example("ignored", count=11)).count == 11


def test_help_shows_docstring_default_and_variable_of_every_flag() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, Example)
    text = " ".join(parser.format_help().split())
    assert "Where it lives (100% of it). (default: required) [NPUSERVE_PATH]" in text
    assert "A share. (default: 0.5) [NPUSERVE_SHARE_OF_IT]" in text
    assert "Optional cap; unset means none. (default: unset) [NPUSERVE_LIMIT]" in text
    assert "Go fast. (default: on) [NPUSERVE_FAST]" in text
    assert "How deep. (default: 3) [NPUSERVE_DEPTH]" in text
    assert "--hidden" not in text


def test_field_docs_and_env_names_cover_nested_settings() -> None:
    assert field_docs(Example)["count"] == "How many."
    assert env_names(Example) == {"NPUSERVE_PATH", "NPUSERVE_COUNT", "NPUSERVE_SHARE_OF_IT",
                                  "NPUSERVE_LIMIT", "NPUSERVE_FAST", "NPUSERVE_MODE",
                                  "NPUSERVE_DEPTH"}


def test_no_flag_fields_are_filled_by_code() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, Example)
    assert from_args(Example, parser.parse_args(["--dir", "x"]), hidden=5).hidden == 5
