"""The package layers: no module imports from a layer above its own.

Lowest first: `protos`, `common`, `preprocess`, then `gateway` and `worker` side by side (neither
imports the other). Imports inside functions and `importlib.import_module("...")` with a literal
name count too: a lazy import is still a dependency. The one dynamic exception is the console
script's root (`common/cli.py`), which registers each package's subcommands by module name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MAY_IMPORT: dict[str, set[str]] = {
    "protos": {"protos"},
    "common": {"protos", "common"},
    "preprocess": {"protos", "common", "preprocess"},
    "gateway": {"protos", "common", "preprocess", "gateway"},
    "worker": {"protos", "common", "preprocess", "worker"},
}


def _package_of(path: Path) -> str:
    """The package a relative import in `path` starts from."""
    parts = path.relative_to(REPO).parts
    return ".".join(parts[:-1])


def _imported(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                found.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            else:
                found.append((node.lineno, node.module or ""))
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def _sources() -> list[Path]:
    return sorted(p for layer in MAY_IMPORT for p in (REPO / layer).rglob("*.py"))


def test_every_layer_is_scanned() -> None:
    assert {p.relative_to(REPO).parts[0] for p in _sources()} == set(MAY_IMPORT)


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_no_import_reaches_a_higher_layer(layer: str) -> None:
    upward = []
    for path in sorted((REPO / layer).rglob("*.py")):
        for line, name in _imported(path.read_text(encoding="utf-8"), _package_of(path)):
            top = name.split(".")[0]
            if top in MAY_IMPORT and top not in MAY_IMPORT[layer]:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not upward, f"{layer} may import only {sorted(MAY_IMPORT[layer])}:\n" + "\n".join(upward)


def test_the_scan_sees_lazy_and_relative_imports() -> None:
    source = ("from . import keys\n"
              "def f():\n    import worker.cli\n    importlib.import_module('gateway.cli')\n")
    found = [name for _, name in _imported(source, "common")]
    assert found == ["common", "worker.cli", "gateway.cli"]
