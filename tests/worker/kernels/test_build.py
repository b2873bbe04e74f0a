"""Building the CPU kernels: cached per source and CPU, and a clear fallback without them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from worker.kernels import build


@pytest.fixture
def kernel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NPUSERVE_KERNEL_CACHE", str(tmp_path))
    build.load_library.cache_clear()
    yield tmp_path
    build.load_library.cache_clear()


def test_the_library_is_built_once_then_loaded_from_the_cache(kernel_cache: Path) -> None:
    assert build.load_library() is not None
    built = list(kernel_cache.glob("npuserve-kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    build.load_library.cache_clear()
    assert build.load_library() is not None
    assert built[0].stat().st_mtime_ns == stamp  # not rebuilt
    assert not list(kernel_cache.glob("*.tmp"))


@pytest.mark.parametrize(("compiler", "message"), [("/nonexistent/cc", "no C compiler"),
                                                   ("false", "failed")])
def test_without_a_working_compiler_the_kernels_are_off_with_a_warning(
    kernel_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    compiler: str, message: str,
) -> None:
    monkeypatch.setenv("NPUSERVE_CC", compiler)
    with caplog.at_level(logging.WARNING, logger="worker.kernels.build"):
        assert build.load_library() is None
    assert message in caplog.text
    assert not list(kernel_cache.iterdir())  # nothing half-built left behind
