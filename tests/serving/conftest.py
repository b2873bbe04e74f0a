"""A real serving fleet for end-to-end tests: gateways and workers as `npuserve` subprocesses.

One module-scoped fleet on the session's redis-server, under a key prefix of its own:

- `gateway`: the main gateway (generous limits);
- `tight`: a second gateway on the same fleet with --max-queued 2 --max-streams 3, for
  admission tests (gateways are stateless, so limits are per gateway process);
- model "tiny": two workers with 16 slots each, for parity and concurrency;
- model "slot": one worker with ONE slot and a /metrics port, so tests can saturate it and
  watch exactly what it runs (priority, cancellation, deadlines).

Every process logs to a file; a failure to start shows the tail of each log.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from gateway.client import GenerationClient, StreamResult
from gateway.output import OutputProcessor
from worker.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_FLAGS = ["--kv-cache-gb", "0.05", "--threads", "1"]


@dataclass
class Service:
    """One `npuserve` subprocess and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 25) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.name} (exit {self.proc.poll()}) ---\n" + "\n".join(text)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_service(name: str, args: list[str], log_dir: Path) -> Service:
    log = log_dir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "common.cli", *args], cwd=REPO_ROOT,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Service(name, proc, log)


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               services: Sequence[Service] = (), poll_s: float = 0.05) -> None:
    """Poll `condition`; on timeout (or a service dying) fail with the services' logs."""
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [s for s in services if s.proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(s.tail() for s in services)
            pytest.fail(f"{what}: {'a process died' if dead else 'timed out'}\n{logs}")
        time.sleep(poll_s)


@dataclass
class Fleet:
    redis_url: str
    prefix: str
    gateway: str
    """host:port of the main gateway."""
    tight: str
    """host:port of the gateway with --max-queued 2 --max-streams 3."""
    slot_metrics: int
    """Port of the one-slot worker's Prometheus /metrics."""
    log_dir: Path
    services: list[Service] = field(default_factory=list)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def queued(self, model: str) -> int:
        with self.redis() as r:
            return int(r.zcard(f"{self.prefix}q:{{{model}}}"))

    def gateway_args(self, listen: str, *extra: str, prefix: str | None = None) -> list[str]:
        return ["gateway", "--listen", listen, "--redis", self.redis_url,
                "--prefix", prefix or self.prefix, *extra]

    def worker_args(self, model_dir: Path, name: str, *extra: str,
                    prefix: str | None = None) -> list[str]:
        return ["worker", "--model", str(model_dir), "--name", name, "--redis", self.redis_url,
                "--prefix", prefix or self.prefix, *WORKER_FLAGS, *extra]


class Stream(threading.Thread):
    """One server-streaming call consumed on its own thread, recording when tokens arrive."""

    def __init__(self, call: Any) -> None:
        super().__init__(daemon=True)
        self.call = call
        """The gRPC call: `call.cancel()` is a client disconnect."""
        self.result = StreamResult()
        self.first_token_at: float | None = None
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.first_token = threading.Event()
        self.arrivals: list[float] = []
        """When each message carrying tokens arrived (time.monotonic)."""
        self.start()

    def run(self) -> None:
        try:
            for message in self.call:
                if message.token_ids:
                    self.arrivals.append(time.monotonic())
                    if self.first_token_at is None:
                        self.first_token_at = time.monotonic()
                        self.first_token.set()
                self.result.add(message)
        except grpc.RpcError as exc:
            self.code, self.details = exc.code(), exc.details() or ""

    def wait_first_token(self, timeout: float = 60.0) -> None:
        assert self.first_token.wait(timeout), f"no token within {timeout}s ({self.code})"

    def longest_stall(self) -> float:
        """The longest wait between two messages carrying tokens, in seconds."""
        return max((b - a for a, b in itertools.pairwise(self.arrivals)), default=0.0)

    def finish(self, timeout: float = 60.0) -> StreamResult:
        self.join(timeout)
        assert not self.is_alive(), f"stream still running after {timeout}s"
        return self.result


def text_of(tokenizer: Any, prompt: Sequence[int], completion: Sequence[int],
            finish_reason: str, stop: Sequence[str] = ()) -> str:
    """The text a client should see for a completion: the gateway's output processing of an
    uninterrupted stream of those token ids."""
    output = OutputProcessor(tokenizer, prompt, stop)
    last = len(completion) - 1
    text = "".join(output.add(t, stop_token=finish_reason == "stop" and i == last)
                   for i, t in enumerate(completion))
    return text + output.finish()


def scrape(port: int, metric: str, **labels: str) -> float:
    """The sum of a metric's samples on a Prometheus /metrics page whose labels include
    `labels` (0 when there is none)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == metric and labels.items() <= sample.labels.items())


@contextmanager
def serving(target: str, models: dict[str, int], services: Sequence[Service], timeout: float,
            what: str) -> Iterator[None]:
    """Wait until the gateway at target lists the models, yield, then stop the services."""
    try:
        wait_until(served(target, models), timeout, what, services)
        yield
    finally:
        for service in services:
            service.stop()


def served(target: str, expected: dict[str, int], api_key: str | None = None
           ) -> Callable[[], bool]:
    """A condition for wait_until: the gateway lists each model with at least n workers."""
    def check() -> bool:
        try:
            with GenerationClient(target, timeout=2, api_key=api_key) as client:
                models = {m.name: len(m.workers) for m in client.list_models().models}
        except grpc.RpcError:  # the gateway may not listen yet
            return False
        return all(models.get(name, 0) >= n for name, n in expected.items())

    return check


@contextmanager
def one_of_each(redis_url: str, model_dir: Path, model: str, log_dir: Path,
                *worker_flags: str, gateway_flags: Sequence[str] = (),
                api_key: str | None = None) -> Iterator[Fleet]:
    """A fleet of its own: one gateway and one worker of `model`, stopped on exit (`api_key`:
    the one to check it with, for a gateway given --api-keys)."""
    fl = Fleet(redis_url, f"{model}-{uuid.uuid4().hex[:8]}:", f"127.0.0.1:{free_port()}",
               "", 0, log_dir)
    try:
        fl.services.append(start_service("gateway", fl.gateway_args(
            fl.gateway, *gateway_flags), log_dir))
        fl.services.append(start_service("worker", fl.worker_args(
            model_dir, model, *worker_flags), log_dir))
        wait_until(served(fl.gateway, {model: 1}, api_key), 150,
                   f"the {model} fleet did not come up", fl.services)
        yield fl
    finally:
        for service in fl.services:
            service.stop()


@pytest.fixture(scope="module")
def fleet(redis_server: str, tiny_qwen3: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fl = Fleet(redis_server, f"e2e-{uuid.uuid4().hex[:8]}:", f"127.0.0.1:{free_port()}",
               f"127.0.0.1:{free_port()}", free_port(), tmp_path_factory.mktemp("fleet"))
    starts = [
        ("gateway", fl.gateway_args(fl.gateway, "--max-queued", "200", "--max-streams", "256")),
        ("tight", fl.gateway_args(fl.tight, "--max-queued", "2", "--max-streams", "3")),
        ("tiny-1", fl.worker_args(tiny_qwen3, "tiny", "--max-num-seqs", "16")),
        ("tiny-2", fl.worker_args(tiny_qwen3, "tiny", "--max-num-seqs", "16")),
        ("slot", fl.worker_args(tiny_qwen3, "slot", "--max-num-seqs", "1",
                                "--metrics-port", str(fl.slot_metrics))),
    ]
    try:
        for name, args in starts:
            fl.services.append(start_service(name, args, fl.log_dir))
        wait_until(served(fl.gateway, {"tiny": 2, "slot": 1}), 150,
                   "the fleet did not come up", fl.services)
        wait_until(served(fl.tight, {"tiny": 2, "slot": 1}), 30,
                   "the tight gateway did not see the workers", fl.services)
        yield fl
    finally:
        for service in fl.services:
            service.proc.send_signal(signal.SIGTERM)
        for service in fl.services:
            service.stop()
