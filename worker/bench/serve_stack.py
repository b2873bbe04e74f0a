"""A throwaway stack for `npuserve bench serve` when no --target is given: redis-server,
`npuserve gateway` and one `npuserve worker`, as child processes (worker.processes, as
`npuserve up` and `bench redis` run them), logging to a file so the progress bar stays
readable. The gateway is waited on through grpc.health.v1 as `npuserve up` does."""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from worker.local_stack import _wait_serving
from worker.processes import ChildSet, free_port, wait_for_port

LOG_TAIL_LINES = 30
"""Lines of the stack's log shown when it fails to start."""


@dataclass(frozen=True, slots=True)
class StackSpec:
    """What the throwaway stack serves, and how."""

    model_dir: str
    worker_args: list[str] = field(default_factory=list)
    """`npuserve worker` flags besides --model and --redis: --backend, --max-num-seqs, the
    backend's settings, ..."""
    gateway_args: list[str] = field(default_factory=list)
    """`npuserve gateway` flags besides --listen, --redis, --max-streams and --max-queued."""
    max_streams: int = 512
    """The gateway's concurrent streams (--max-streams): at least the load's concurrency."""
    startup_timeout_s: float = 300.0


class StackError(RuntimeError):
    """The stack did not come up; the message ends with the tail of its log."""


@contextmanager
def local_stack(spec: StackSpec) -> Iterator[str]:
    """Start the stack, yield the gateway's host:port once it is SERVING, stop it after."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("redis-server is not on PATH (make setup)")
    workdir = Path(tempfile.mkdtemp(prefix="npuserve-bench-serve-"))
    log_path = workdir / "stack.log"
    log = open(log_path, "w")  # noqa: SIM115 -- closed in finally
    children = ChildSet(out=log)
    port, target = free_port(), f"127.0.0.1:{free_port()}"
    url = f"redis://127.0.0.1:{port}/0"
    python = [sys.executable, "-m", "common.cli"]
    try:
        redis = children.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no",
                                         "--dir", str(workdir)])
        if not wait_for_port("127.0.0.1", port, 10, redis):
            raise StackError(f"redis-server did not start{_tail(log, log_path)}")
        children.start("gateway", [*python, "gateway", "--listen", target, "--redis", url,
                                   "--max-streams", str(spec.max_streams),
                                   "--max-queued", str(max(1024, 2 * spec.max_streams)),
                                   *spec.gateway_args])
        children.start("worker", [*python, "worker", "--model", spec.model_dir, "--redis", url,
                                  *spec.worker_args])
        if not _wait_serving(target, children, threading.Event(), spec.startup_timeout_s):
            raise StackError(f"the stack did not become SERVING{_tail(log, log_path)}")
        yield target
    finally:
        children.terminate([n for n in ("worker", "gateway") if n in children.children], 30)
        children.terminate(["redis"], 10)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _tail(log: object, path: Path) -> str:
    flush = getattr(log, "flush", None)
    if callable(flush):
        flush()
    lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return ":\n" + "\n".join(lines) if lines else ""
