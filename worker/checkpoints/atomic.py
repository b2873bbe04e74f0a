"""Build a model directory so that it appears whole or not at all.

A builder writes into a temporary sibling of the target and renames it into place at the end,
so an interrupted build (Ctrl-C, a killed test worker) never leaves a half model that a later
run would mistake for a finished one.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
"""Files every checkpoint this package builds contains."""


def is_complete_model(path: Path) -> bool:
    """Whether `path` holds a checkpoint with config, weights and tokenizer."""
    return all((Path(path) / name).is_file() for name in MODEL_FILES)


@contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `out_dir` when the block succeeds.

    On an exception the temporary directory is removed and `out_dir` is left as it was.
    An existing `out_dir` is replaced; the old contents are deleted only after the rename.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model should read like any directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    trash = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    out_dir.rename(trash / "model")
    try:
        tmp.rename(out_dir)
    except BaseException:
        (trash / "model").rename(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
