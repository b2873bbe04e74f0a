"""`npuserve worker`: flags and their environment defaults, and a real process drained by
SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from common.cli import build_parser
from common.errors import ModelConfigError
from common.sampling_params import SamplingParams
from worker.backends.torch_settings import TorchSettings
from worker.cli import config_from_args

if TYPE_CHECKING:
    from tests.worker.conftest import FakeGateway

REPO_ROOT = Path(__file__).resolve().parents[2]
LONG = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)


def test_flags_build_the_worker_config() -> None:
    args = build_parser().parse_args([
        "worker", "--model", "m", "--name", "qwen", "--max-num-seqs", "3",
        "--max-batched-tokens", "64", "--kv-cache-gb", "0.5", "--threads", "2",
        "--lease-ms", "2000", "--drain-timeout", "1.5", "--prefix", "x:"])
    config = config_from_args(args)
    assert (config.model_dir, config.model_name, config.lease_ms) == ("m", "qwen", 2000)
    assert config.drain_timeout_s == 1.5 and config.redis.prefix == "x:"
    assert (config.engine.max_num_seqs, config.engine.max_num_batched_tokens) == (3, 64)
    assert config.backend_settings == TorchSettings(kv_cache_gb=0.5, threads=2)
    args = build_parser().parse_args(["worker", "--model", "m", "--no-cpu-kernels",
                                      "--block-size", "32", "--dtype", "bfloat16"])
    assert config_from_args(args).backend_settings == TorchSettings(
        cpu_kernels=False, block_size=32, dtype="bfloat16")


def test_defaults_come_from_npuserve_environment_variables(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv("NPUSERVE_MODEL_DIR", "/models/a")
    monkeypatch.setenv("NPUSERVE_REDIS_URL", "redis://10.0.0.1:7000/1")
    monkeypatch.setenv("NPUSERVE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("NPUSERVE_KV_CACHE_GB", "2")
    monkeypatch.setenv("NPUSERVE_CPU_KERNELS", "0")
    config = config_from_args(build_parser().parse_args(["worker"]))
    assert config.model_dir == "/models/a" and config.redis.url == "redis://10.0.0.1:7000/1"
    assert config.engine.max_num_seqs == 7 and config.worker_id == ""
    assert config.backend_settings == TorchSettings(kv_cache_gb=2.0, cpu_kernels=False)


def test_an_unknown_backend_is_refused_naming_the_registered_ones() -> None:
    args = build_parser().parse_args(["worker", "--model", "m", "--backend", "tpu"])
    with pytest.raises(ModelConfigError, match="unknown backend 'tpu'.*torch"):
        config_from_args(args)


def test_help_names_the_environment_variable_of_every_flag(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--help"])
    text = capsys.readouterr().out
    for flag in ("--redis", "--prefix", "--lease-ms", "--drain-timeout", "--metrics-port",
                 "--max-batched-tokens", "--kv-cache-gb", "--cpu-kernels", "--block-size"):
        assert flag in text
    assert text.count("[NPUSERVE_") == text.count("\n  --")  # one variable per flag
    assert text.count("[NPUSERVE_") >= 20


def _wait(what: str, done: Callable[[], object], proc: subprocess.Popen[bytes],
          timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.communicate()[0].decode(errors="replace")
            pytest.fail(f"{what} did not happen (rc {proc.returncode}):\n{out[-3000:]}")
        time.sleep(0.05)


def test_sigterm_drains_hands_unfinished_requests_back_and_exits_zero(
        tiny_qwen3: Path, redis_url: str, gateway: FakeGateway) -> None:
    c, k = gateway.client, gateway.keys
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "worker", "--model", str(tiny_qwen3),
         "--name", "tiny", "--redis", redis_url, "--worker-id", "w-sub", "--max-num-seqs", "2",
         "--kv-cache-gb", "0.05", "--threads", "1", "--drain-timeout", "0.5"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait("registration", lambda: c.exists(k.worker("w-sub")), proc, 120)
        gateway.enqueue("a", [1, 2, 3], LONG)
        gateway.enqueue("b", [4, 5], LONG)
        _wait("streaming", lambda: len(gateway.events("a")) >= 2 and gateway.events("b"),
              proc, 60)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "handed 2 unfinished requests back" in out
    assert not c.exists(k.worker("w-sub")) and c.zscore(k.workers(), "w-sub") is None
    assert sorted(c.zrange(k.queue("tiny"), 0, -1)) == ["a", "b"]
    assert c.zcard(k.leases("tiny")) == 0
    for rid in ("a", "b"):
        published = [str(e.token_id) for e in gateway.events(rid)]
        assert published and c.lrange(k.tokens("tiny", rid), 0, -1) == published
        assert not any(e.finish_reason for e in gateway.events(rid))
