"""The card runtime (sophon.sail) through the same protocol, on a stand-in `sail` with the
real signatures whose nets answer from the recorded simulator run: the card path must feed
the nets exactly what the simulator received, keep hidden states and KV slots in device
memory, report get_dev_stat, and turn a failed launch into a DeviceError."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from common.errors import DeviceError, ModelConfigError
from tests.worker.backends import sail_standin
from tests.worker.backends.test_sophon_replay import Replay
from worker.backends.sophon.card import SailRuntime
from worker.backends.sophon.protocol import BmodelSession


def test_the_card_path_reproduces_the_simulator_run_with_kv_kept_on_the_device(
        manifest: dict[str, Any]) -> None:
    replay = Replay()
    sail = sail_standin.module(manifest["nets"], replay.run)
    runtime = SailRuntime("qwen2.bmodel", 0, sail=sail)
    session = BmodelSession(runtime, manifest)
    traffic = runtime.handle.traffic
    tokens = [int(session.prefill(manifest["prompt"]).argmax())]
    vocab, seqlen, layers = manifest["vocab_size"], manifest["seqlen"], manifest["num_layers"]
    assert traffic.to_host == 4 * vocab  # lm_head's float32 logits, nothing else
    while len(tokens) < len(manifest["tokens"]):
        before_up, before_down = traffic.to_device, traffic.to_host
        tokens.append(int(session.decode(tokens[-1]).argmax()))
        # Up: the token id, then per layer its position and a mask of SEQLEN + 1 bfloat16s.
        assert traffic.to_device - before_up == 4 + layers * (4 + 2 * (seqlen + 1))
        assert traffic.to_host - before_down == 4 * vocab
    assert tokens == manifest["tokens"]
    assert replay.next == len(replay.calls)


def test_device_stats_come_from_get_dev_stat(manifest: dict[str, Any]) -> None:
    sail = sail_standin.module(manifest["nets"], Replay().run, stat=(16384, 5120, 37))
    stats = SailRuntime("qwen2.bmodel", 1, sail=sail).device_stats()
    assert (stats.memory_total_bytes, stats.memory_used_bytes) == (16384 << 20, 5120 << 20)
    assert stats.utilization == pytest.approx(0.37)


def test_a_failed_launch_is_a_device_error_naming_the_net_and_card(
        manifest: dict[str, Any]) -> None:
    sail = sail_standin.module(manifest["nets"], Replay().run)
    runtime = SailRuntime("qwen2.bmodel", 3, sail=sail)
    session = BmodelSession(runtime, manifest)
    sail.engine.fail_next.add("block_1")
    with pytest.raises(DeviceError, match="net block_1 failed on BM1684X card 3"):
        session.prefill(manifest["prompt"])
    assert session.length == 0


def test_without_the_sdk_the_card_path_says_what_to_install() -> None:
    with pytest.raises(ModelConfigError, match="SOPHON SDK"):
        SailRuntime("qwen2.bmodel", 0)


def test_bfloat16_buffers_start_zeroed_on_the_device(manifest: dict[str, Any]) -> None:
    runtime = SailRuntime("qwen2.bmodel", 0,
                          sail=sail_standin.module(manifest["nets"], Replay().run))
    buffer = runtime.buffer((1, 4, 2, 2))
    assert not buffer.device.any() and buffer.own_sys_data() is False
    assert np.array_equal(runtime.buffer((2,)).device, np.zeros(2, np.uint16))
