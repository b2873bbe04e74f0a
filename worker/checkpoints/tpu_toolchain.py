"""Sophgo's tpu-mlir, the BM1684X compiler and C-model simulator, in a virtualenv of its own.

tpu-mlir needs Python 3.10 exactly and pins numpy 1.24, protobuf 3.20 and transformers 5.6,
so it cannot share the project's environment: npuserve drives its tools by subprocess, with
the toolchain's `bin/` first on PATH (its scripts call each other through `python3`). Setting
it up needs care the package does not take itself:

- it bundles Ubuntu 22.04's glibc and libpython in `tpu_mlir/lib/third_party/`; loaded on a
  newer system they break every tool (`GLIBC_2.36 not found`), so they are moved aside;
- its converter imports torch, psutil and flatbuffers without declaring them;
- it runs its per-net compiles through GNU parallel.

`ensure_toolchain` does all of that once and records it in a stamp file, so later calls cost
a stat. The venv defaults to NPUSERVE_TPU_MLIR_VENV, else ~/.cache/npuserve/tpu-mlir-<version>.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.config import env
from common.errors import ModelConfigError

log = logging.getLogger(__name__)

TPU_MLIR_VERSION = "1.30.2"
EXTRA_PACKAGES = ("psutil", "flatbuffers", "torch==2.11.0")
"""What the converter imports without declaring it (torch at the release its tools import)."""
BUNDLED_SYSTEM_LIBS = ("libc.so.6", "libm.so.6", "libpthread.so.0", "libpython3.10.so.1.0")
"""Ubuntu 22.04's libraries inside the wheel that shadow the system's."""
STAMP = ".npuserve-toolchain"


def default_venv() -> Path:
    return Path(env("TPU_MLIR_VENV", str(Path.home() / ".cache" / "npuserve"
                                          / f"tpu-mlir-{TPU_MLIR_VERSION}")))


@dataclass(frozen=True, slots=True)
class Toolchain:
    """A ready tpu-mlir venv: run its tools with `run`."""

    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def environment(self) -> dict[str, str]:
        """The process environment its tools expect: the venv active, its bin first."""
        environ = dict(os.environ)
        environ["PATH"] = f"{self.bin}{os.pathsep}{environ.get('PATH', '')}"
        environ["VIRTUAL_ENV"] = str(self.venv)
        environ.pop("PYTHONPATH", None)
        environ.pop("PYTHONHOME", None)
        return environ

    def command(self, tool: str, *args: str) -> list[str]:
        return [str(self.bin / tool), *args]


def find_python310() -> Path:
    """A CPython 3.10 that runs: python3.10 on PATH, else one under pyenv. A pyenv shim on
    PATH counts only if it runs (it fails while 3.10 is not a selected pyenv version)."""
    candidates = [found] if (found := shutil.which("python3.10")) else []
    candidates += sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.10*/bin/python3.10")))
    for candidate in candidates:
        probe = subprocess.run([candidate, "-c", "import venv"], capture_output=True)
        if probe.returncode == 0:
            return Path(candidate)
    raise ModelConfigError(
        "tpu-mlir needs Python 3.10 exactly and none was found; install it (e.g. "
        "`pyenv install 3.10`) or put python3.10 on PATH")


def is_ready(venv: Path) -> bool:
    """Whether `venv` holds this version's toolchain, fully set up."""
    stamp = venv / STAMP
    return stamp.is_file() and stamp.read_text().strip() == TPU_MLIR_VERSION


def ensure_toolchain(venv: Path | None = None) -> Toolchain:
    """The toolchain at `venv` (default_venv()), set up first if needed; idempotent."""
    venv = venv or default_venv()
    if is_ready(venv):
        return Toolchain(venv)
    if shutil.which("parallel") is None:
        raise ModelConfigError(
            "tpu-mlir compiles its nets with GNU parallel, which is not installed; install it "
            "(Debian/Ubuntu: apt-get install parallel)")
    log.info("setting up tpu-mlir %s in %s (about 6 GB with torch; minutes)",
             TPU_MLIR_VERSION, venv)
    if not (venv / "bin" / "python").is_file():
        _run([str(find_python310()), "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, "--upgrade", "pip"])
    _run([*pip, f"tpu-mlir=={TPU_MLIR_VERSION}", *EXTRA_PACKAGES])
    move_bundled_system_libs(venv)
    (venv / STAMP).write_text(TPU_MLIR_VERSION + "\n")
    log.info("tpu-mlir %s ready in %s", TPU_MLIR_VERSION, venv)
    return Toolchain(venv)


def require_toolchain(venv: Path | None = None) -> Toolchain:
    """The toolchain, or an error saying how to set it up."""
    venv = venv or default_venv()
    if not is_ready(venv):
        raise ModelConfigError(
            f"no tpu-mlir {TPU_MLIR_VERSION} toolchain at {venv}; set it up with "
            f"`npuserve model tpu-toolchain --venv {venv}` (or `make bm1684x-toolchain`)")
    return Toolchain(venv)


def move_bundled_system_libs(venv: Path) -> list[Path]:
    """Move the wheel's copies of glibc and libpython out of its library path; returns what
    moved (nothing on a second call)."""
    moved = []
    for third_party in venv.glob("lib/python3.10/site-packages/tpu_mlir/lib/third_party"):
        aside = third_party.parent / "third_party.system-libs"
        aside.mkdir(exist_ok=True)
        for name in BUNDLED_SYSTEM_LIBS:
            if (third_party / name).exists():
                (third_party / name).rename(aside / name)
                moved.append(aside / name)
    return moved


def _run(args: Sequence[str]) -> None:
    log.info("$ %s", " ".join(args))
    subprocess.run(list(args), check=True)
