"""The bmodel protocol against a stand-in pinned to a real BM1684X simulator run: every net
call must carry exactly the inputs the recorded run carried, and gets its recorded outputs
(record_sophon_fixture.py made them from tpu-mlir's compiler and simulator)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from tests.worker.backends.record_sophon_fixture import RECORDING
from worker.backends.sophon.protocol import BmodelSession, HostRuntime


class Replay(HostRuntime):
    """Answers net calls from the recording, in order, after checking their inputs."""

    def __init__(self) -> None:
        with np.load(RECORDING) as archive:
            arrays = {name: archive[name] for name in archive.files}
        calls: dict[int, dict[str, Any]] = {}
        for key, value in arrays.items():
            index, net, io, name = key.split(":")
            call = calls.setdefault(int(index), {"net": net, "in": {}, "out": {}})
            call[io][name] = value
        self.calls = [calls[i] for i in sorted(calls)]
        self.next = 0

    def run(self, net: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        call = self.calls[self.next]
        self.next += 1
        assert net == call["net"], f"call {self.next - 1}: {net}, recorded {call['net']}"
        assert set(inputs) == set(call["in"])
        for name, recorded in call["in"].items():
            np.testing.assert_array_equal(np.asarray(inputs[name]).reshape(recorded.shape),
                                          recorded, err_msg=f"{net}.{name}")
        return dict(call["out"])


def test_prefill_and_decode_send_what_the_simulator_run_received(
        manifest: dict[str, Any]) -> None:
    replay = Replay()
    session = BmodelSession(replay, manifest)
    tokens = [int(session.prefill(manifest["prompt"]).argmax())]
    while len(tokens) < len(manifest["tokens"]):
        tokens.append(int(session.decode(tokens[-1]).argmax()))
    assert tokens == manifest["tokens"]
    assert replay.next == len(replay.calls), "the run made calls the protocol did not"


def test_the_stand_in_notices_a_protocol_that_drifts(manifest: dict[str, Any]) -> None:
    session = BmodelSession(Replay(), manifest)
    with pytest.raises(AssertionError, match="input_ids"):
        session.prefill([6, 77, 301, 12])
