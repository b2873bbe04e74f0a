"""Compile the C kernels in csrc/ for this machine on first use, cache the library, load it.

The library is built with `-O3 -march=native -fopenmp`, so it uses the vector units of the
CPU it runs on; the cache key covers the sources, the compiler and the CPU's feature flags,
so a cache shared between machines never loads code built for another CPU. Building takes a
few seconds and happens once per key; concurrent workers race harmlessly (each writes its
own temporary file and renames it into place). Without a C compiler, or when the build
fails, `load_library` logs why once and returns None, and the engine keeps PyTorch's ops.

The library links the same `libgomp.so.1` that PyTorch has already loaded, so its parallel
regions share PyTorch's OpenMP thread pool and thread count rather than competing with it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from common.config import env

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")


def cache_dir() -> Path:
    return Path(env("KERNEL_CACHE", str(Path.home() / ".cache" / "npuserve" / "kernels")))


def cpu_flags() -> str:
    """The CPU's feature flags line from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (the platform's processor elsewhere)."""
    fallback = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")]
    except OSError:  # not Linux
        return fallback
    return names[0] if names else fallback


def _compiler() -> str | None:
    """NPUSERVE_CC if set (and nothing else then), else cc or gcc from PATH."""
    chosen = env("CC", "")
    if chosen:
        return shutil.which(chosen)
    return shutil.which("cc") or shutil.which("gcc")


def library_path(compiler: str) -> Path:
    """Where the library for these sources, this compiler and this CPU lives."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    version = subprocess.run([compiler, "--version"], check=False, capture_output=True,
                             text=True).stdout
    for part in (version, " ".join(FLAGS), platform.machine(), cpu_flags()):
        digest.update(part.encode())
    return cache_dir() / f"npuserve-kernels-{digest.hexdigest()[:16]}.so"


def build(compiler: str, out: Path) -> None:
    """Compile every csrc/*.c into the shared library `out`, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    sources = [str(p) for p in sorted(SOURCE_DIR.glob("*.c"))]
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", tmp, *sources, "-lm"],
                                check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed:\n{result.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | None:
    """The compiled kernels, built now if needed; None (with a warning) if they cannot be."""
    import torch  # noqa: F401  (its libgomp must be loaded first, so the library shares it)

    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler (NPUSERVE_CC, cc or gcc) found: CPU kernels disabled, using "
                    "PyTorch's ops (slower decode); install gcc to enable them")
        return None
    try:
        path = library_path(compiler)
        if not path.is_file():
            log.info("compiling CPU kernels for this machine into %s", path)
            build(compiler, path)
        return ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as exc:
        log.warning("CPU kernels unavailable, using PyTorch's ops (slower decode): %s", exc)
        return None
