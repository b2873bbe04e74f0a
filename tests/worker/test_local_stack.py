"""`npuserve up` end to end: it starts Redis, a gateway and a worker, serves, and cleans up.

Each test runs the real command as a subprocess with the tiny Qwen3 checkpoint, finds its
children through /proc, and checks that none of them outlives it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.client import GenerationClient, collect, sampling
from worker.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_ARGS = "--kv-cache-gb 0.05 --max-num-seqs 4 --threads 1"
READY = "npuserve is ready"
BANNER_END = "Ctrl-C stops everything"
"""The last line of the ready banner: once it is read, the whole banner is."""


class UpProcess:
    """`npuserve up` in the background, its output collected line by line."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "common.cli", *argv], cwd=REPO_ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if BANNER_END in line:
                self.ready.set()

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`npuserve up` never became ready:\n{self.output()}")

    def children(self) -> dict[str, int]:
        """PIDs of the direct children, keyed redis / gateway / worker."""
        found: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid != self.proc.pid:
                continue
            words = [w.decode(errors="replace") for w in cmdline]
            name = next((n for n in ("redis", "gateway", "worker")
                         if any(n in w for w in words[:6])), "?")
            found[name] = int(entry.name)
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _pids_with_args(*words: str) -> list[int]:
    """PIDs of live processes whose command line holds every one of `words`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if entry.name.isdigit() and all(w in args for w in words) and _alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def up_factory() -> Iterator[list[UpProcess]]:
    started: list[UpProcess] = []
    yield started
    for up in started:
        up.stop()


@pytest.mark.timeout(240)
def test_up_serves_a_client_and_stops_every_child_on_sigint(
        tiny_qwen3: Path, up_factory: list[UpProcess]) -> None:
    target, metrics, http = f"127.0.0.1:{free_port()}", free_port(), free_port()
    up = UpProcess(["up", "--model", str(tiny_qwen3), "--listen", target,
                    "--http-listen", f"127.0.0.1:{http}",
                    "--metrics-port", str(metrics), f"--worker-args={WORKER_ARGS}"])
    up_factory.append(up)
    up.wait_ready(180)
    assert READY in up.output()
    assert f"npuserve client --target {target}" in up.output()
    assert f"chat page: http://127.0.0.1:{http}/chat" in up.output()
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/models", timeout=5) as page:
        assert json.load(page)["data"][0]["max_model_len"] > 0
    for port, who in ((metrics, "gateway"), (metrics + 1, "worker 0")):
        assert f"metrics: http://127.0.0.1:{port}/metrics ({who})" in up.output()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            assert b"npuserve_build_info" in page.read()
    children = up.children()
    assert set(children) == {"redis", "gateway", "worker"}, up.output()

    cli = subprocess.run(
        [sys.executable, "-m", "common.cli", "client", "--target", target, "--max-tokens", "6",
         "--temperature", "0", "-v", "hello"],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "finish=" in cli.stderr and "completion_tokens=" in cli.stderr

    with GenerationClient(target, timeout=60) as client:
        result = collect(client.generate("hello there", max_tokens=6, ignore_eos=True,
                                         sampling=sampling(temperature=0)))
    assert result.completion_tokens == 6
    assert len(result.indices) >= 2, "expected the reply in several streamed messages"

    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=90) == 0, up.output()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in children.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [n for n, pid in children.items() if _alive(pid)], up.output()


@pytest.mark.timeout(120)
def test_up_stops_the_others_and_fails_when_a_child_dies(
        tiny_qwen3: Path, up_factory: list[UpProcess]) -> None:
    target = f"127.0.0.1:{free_port()}"
    up = UpProcess(["up", "--model", str(tiny_qwen3), "--listen", target, "--http-listen", "",
                    "--worker-args=--no-such-flag"])
    up_factory.append(up)
    code = up.proc.wait(timeout=100)
    assert code != 0
    assert "worker exited with code" in up.output()
    redis_port = next(line.rsplit(":", 1)[1] for line in up.lines
                      if "starting redis-server on" in line)
    time.sleep(0.5)
    assert _pids_with_args("--listen", target) == [], "the gateway outlived `up`"
    assert _pids_with_args("--port", redis_port) == [], "redis-server outlived `up`"


def test_up_refuses_a_missing_model_directory(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "common.cli", "up", "--model", str(tmp_path / "absent")],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "npuserve model smollm2" in done.stderr


def test_up_without_redis_server_on_path_says_so(tiny_qwen3: Path) -> None:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    done = subprocess.run(
        [sys.executable, "-m", "common.cli", "up", "--model", str(tiny_qwen3),
         "--listen", f"127.0.0.1:{free_port()}"],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    assert "redis-server is not on PATH" in done.stdout


@pytest.mark.timeout(240)
def test_up_starts_a_worker_per_device_and_a_tensor_parallel_group(
        tiny_qwen3: Path, up_factory: list[UpProcess]) -> None:
    target = f"127.0.0.1:{free_port()}"
    up = UpProcess(["up", "--model", str(tiny_qwen3), "--listen", target, "--http-listen", "",
                    "--devices", "cpu", "cpu:0-1", f"--worker-args={WORKER_ARGS}"])
    up_factory.append(up)
    up.wait_ready(180)
    assert "starting worker0: loading" in up.output(), up.output()
    assert "starting worker1: loading" in up.output() and "on cpu:0-1" in up.output()
    with GenerationClient(target, timeout=60) as client:
        deadline = time.monotonic() + 120
        while not any(len(m.workers) == 2 for m in client.list_models().models):
            assert time.monotonic() < deadline, up.output()
            time.sleep(0.5)
        result = collect(client.generate("hello there", max_tokens=4, ignore_eos=True,
                                         sampling=sampling(temperature=0)))
    assert result.completion_tokens == 4
    assert "tensor parallel over 2 ranks" in up.output()


def test_a_cpu_worker_gets_a_kv_cache_sized_for_the_demo_batch(tiny_qwen3: Path) -> None:
    from worker.local_stack import DEMO_KV_TOKENS, kv_cache_gb

    cfg = json.loads((tiny_qwen3 / "config.json").read_text())
    per_token = (2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"]
                 * 4)
    assert kv_cache_gb(tiny_qwen3) == pytest.approx(
        max(per_token * DEMO_KV_TOKENS / (1 << 30), 0.01))
    smol = REPO_ROOT / "models" / "smollm2-135m-instruct"
    if (smol / "config.json").is_file():  # 30 layers, 3 KV heads of 64: 45 KiB a token
        assert kv_cache_gb(smol) == pytest.approx(0.703, abs=0.001)
