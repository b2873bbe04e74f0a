"""Running a bmodel on Sophgo's BM1684X C-model simulator, from the project's Python.

The simulator is tpu-mlir's `pyruntime_bm`, which lives in the toolchain's Python 3.10 venv;
`SimulatorRuntime` starts `sim_server.py` there and calls nets over a pair of pipes of its
own (the simulator prints to stdout). It is a runtime for `protocol.BmodelSession`, with
the same `run(net, inputs) -> outputs` a card's runtime has. About a second of CPU per net
call on a tiny model: it is for correctness, not speed.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from common.errors import DeviceError, ModelConfigError
from worker.backends.sophon.protocol import HostRuntime
from worker.checkpoints.tpu_toolchain import Toolchain

log = logging.getLogger(__name__)
SERVER = Path(__file__).with_name("sim_server.py")


def _write(stream: BinaryIO, arrays: Mapping[str, Any]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    stream.write(struct.pack("<Q", len(payload)) + payload)
    stream.flush()


def _read(stream: BinaryIO) -> dict[str, np.ndarray]:
    head = stream.read(8)
    if len(head) < 8:
        raise ModelConfigError("the BM1684X simulator process ended; see its output above")
    (size,) = struct.unpack("<Q", head)
    with np.load(io.BytesIO(stream.read(size))) as archive:
        return {name: archive[name] for name in archive.files}


class SimulatorRuntime(HostRuntime):
    """One bmodel loaded in a simulator process; `run` calls one net."""

    def __init__(self, bmodel: Path, toolchain: Toolchain) -> None:
        self.bmodel = bmodel
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        self._proc = subprocess.Popen(
            [str(toolchain.bin / "python"), str(SERVER), str(bmodel), str(request_r),
             str(reply_w)],
            env=toolchain.environment(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(request_r, reply_w))
        os.close(request_r)
        os.close(reply_w)
        self._requests = os.fdopen(request_w, "wb")
        self._replies = os.fdopen(reply_r, "rb")
        self._lock = threading.Lock()
        self._stderr: list[bytes] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.nets = [str(n) for n in self._receive()["__nets__"]]

    def run(self, net: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs by name (bfloat16 as uint16) -> outputs by name."""
        with self._lock:
            _write(self._requests, {"__net__": np.array(net), **inputs})
            reply = self._receive()
        if "__error__" in reply:
            log.warning("net %s failed on the simulator:\n%s", net, reply["__error__"])
            raise DeviceError(f"net {net} failed on the BM1684X simulator: "
                              f"{str(reply['__error__']).strip().splitlines()[-1]}")
        return reply

    def close(self) -> None:
        self._requests.close()
        self._proc.wait(30)
        self._replies.close()

    def _receive(self) -> dict[str, np.ndarray]:
        try:
            return _read(self._replies)
        except ModelConfigError as exc:
            tail = b"".join(self._stderr)[-2000:].decode(errors="replace")
            raise ModelConfigError(f"{exc}\n{tail}") from None

    def _drain_stderr(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-200]
