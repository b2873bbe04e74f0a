"""Prometheus' own checker, `promtool` (Debian's `prometheus` package; `make setup` installs
it): metric expositions, rule files and rule unit tests are checked by the tool Prometheus
itself uses, not by a copy of its rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make setup` installs it (Debian package prometheus)"
    return path


def check_metrics(exposition: str) -> None:
    """Fail with promtool's findings unless `exposition` lints clean."""
    done = subprocess.run([promtool(), "check", "metrics"], input=exposition, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        f"promtool check metrics:\n{done.stdout}{done.stderr}")


def run(*args: str | Path) -> str:
    """`promtool ARGS`; fails with its output unless it exits 0. Returns its output."""
    done = subprocess.run([promtool(), *map(str, args)], text=True, capture_output=True,
                          timeout=120)
    assert done.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr
