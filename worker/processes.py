"""Child processes with prefixed logs, stopped in order: what `npuserve up` is made of.

Children run in their own sessions, so a Ctrl-C in the terminal reaches only the parent, which
then stops them in the order it chooses (worker and gateway drain before Redis goes). On Linux
each child also gets SIGTERM if the parent dies without cleaning up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (another process may still take it first)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float,
                  proc: Child | None = None) -> bool:
    """True once `host:port` accepts connections; False on timeout or if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            if proc is not None and proc.proc.poll() is not None:
                return False
            time.sleep(0.05)
    return False


def _load_prctl() -> Callable[..., int] | None:
    if sys.platform != "linux":
        return None
    import ctypes

    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: a child that outlived a SIGKILLed parent would
    # keep holding its port and the model's memory. prctl was resolved before the fork, so
    # this takes no lock another thread could have held.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One child process and the thread copying its output, line by line, with a prefix."""

    name: str
    proc: subprocess.Popen[str]
    reader: threading.Thread | None = None


@dataclass
class ChildSet:
    """Named children sharing one output stream; every line says which child wrote it."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    children: dict[str, Child] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def say(self, text: str, name: str = "up") -> None:
        """Print `text` (one or more lines) with `name` as each line's prefix."""
        width = max(7, len(name))
        with self._lock:
            for line in text.splitlines() or [""]:
                self.out.write(f"{name:<{width}} | {line}\n")
            self.out.flush()

    def start(self, name: str, argv: list[str]) -> Child:
        """Start `argv` as child `name`, its stdout and stderr merged into the prefixed log."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", bufsize=1, env=env, start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 -- only a pre-resolved prctl call
        )
        child = Child(name, proc)
        child.reader = threading.Thread(target=self._copy, args=(child,), daemon=True,
                                        name=f"log-{name}")
        self.children[name] = child
        child.reader.start()
        return child

    def get(self, name: str) -> Child | None:
        return self.children.get(name)

    def failed(self) -> Child | None:
        """The first child that has exited, if any: none of them should exit on its own."""
        return next((c for c in self.children.values() if c.proc.poll() is not None), None)

    def terminate(self, names: list[str], timeout: float) -> None:
        """SIGTERM the named children together, wait up to `timeout`, then SIGKILL the rest."""
        live = [self.children[n] for n in names
                if n in self.children and self.children[n].proc.poll() is None]
        for child in live:
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in live:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} did not stop within {timeout:.0f}s; killing it")
                child.proc.kill()
                child.proc.wait()
        for name in names:
            reader = self.children[name].reader if name in self.children else None
            if reader is not None:
                reader.join(timeout=2.0)

    def kill_all(self) -> None:
        """SIGKILL every live child at once (a second Ctrl-C)."""
        for child in self.children.values():
            if child.proc.poll() is None:
                child.proc.kill()

    def _copy(self, child: Child) -> None:
        assert child.proc.stdout is not None
        for line in child.proc.stdout:
            self.say(line.rstrip("\n"), child.name)
        child.proc.stdout.close()
