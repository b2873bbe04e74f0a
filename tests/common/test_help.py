"""Every flag of the long-running commands names the NPUSERVE_* variable that sets it, so a
deployment configured by environment (compose, a ConfigMap) can find each one in --help."""

from __future__ import annotations

import argparse

import pytest

from common.cli import build_parser


def _subcommand(name: str) -> argparse.ArgumentParser:
    root = build_parser()
    action = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = action.choices[name]
    return parser


@pytest.mark.parametrize("command", ["gateway", "worker", "up"])
def test_every_flag_names_its_environment_variable(command: str) -> None:
    silent = [
        a.option_strings[-1] for a in _subcommand(command)._actions
        if a.option_strings and a.help != argparse.SUPPRESS and "-h" not in a.option_strings
        and "NPUSERVE_" not in (a.help or "")]
    assert not silent, f"`npuserve {command}` flags without their variable: {silent}"
