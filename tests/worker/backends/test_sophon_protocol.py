"""The bmodel protocol's inputs, checked against a runtime that records every net call and
answers with recognisable keys and values (no toolchain needed; make test-bm1684x runs the
same code on Sophgo's simulator)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from common.errors import InvalidRequestError
from worker.backends.sophon.protocol import MASKED, BmodelSession, HostRuntime, SlotGroup

SEQLEN, HIDDEN, KVH, D, LAYERS = 8, 4, 2, 3, 2


def manifest(batch: int = 1) -> dict[str, Any]:
    def t(name: str, shape: list[int]) -> dict[str, Any]:
        return {"name": name, "shape": shape, "dtype": "bfloat16"}

    return {"seqlen": SEQLEN, "num_layers": LAYERS, "nets": {
        "embedding": {"inputs": [t("input_ids", [1, SEQLEN])],
                      "outputs": [t("embedding", [1, SEQLEN, HIDDEN])]},
        "block_cache_0": {"inputs": [t("history_k", [batch, SEQLEN, KVH, D]),
                                     t("history_v", [batch, SEQLEN, KVH, D])]}}}


class Recorder(HostRuntime):
    """Keys and values stamped with the position they belong to: k = 100 + pos, v = 200."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, np.ndarray]]] = []

    def run(self, net: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append((net, {k: np.array(v) for k, v in inputs.items()}))
        if net == "embedding":
            return {"embedding": np.zeros((1, SEQLEN, HIDDEN), np.uint16)}
        if net == "embedding_cache":
            return {"embedding_cache": np.zeros((1, 1, HIDDEN), np.uint16)}
        if net.startswith("block_cache_"):
            pos = np.asarray(inputs["position_ids"]).reshape(-1, 1, 1, 1).astype(np.uint16)
            batch = pos.shape[0]
            return {"output_states": np.broadcast_to(pos[:, :, :, 0], (batch, 1, HIDDEN)).copy(),
                    "k_cache": np.broadcast_to(100 + pos, (batch, 1, KVH, D)).copy(),
                    "v_cache": np.broadcast_to(200 + pos, (batch, 1, KVH, D)).copy()}
        if net.startswith("block_"):
            keys = (100 + np.arange(SEQLEN, dtype=np.uint16))[None, :, None, None]
            return {"output_states": np.arange(SEQLEN * HIDDEN, dtype=np.uint16).reshape(
                        1, SEQLEN, HIDDEN),
                    "k_cache": np.broadcast_to(keys, (1, SEQLEN, KVH, D)).copy(),
                    "v_cache": np.broadcast_to(keys + 100, (1, SEQLEN, KVH, D)).copy()}
        assert net == "lm_head"
        return {"logits": np.array(inputs["hidden_states"], np.float32).reshape(1, -1)}


def test_prefill_masks_causally_keeps_only_the_prompts_rows_and_reads_its_last_state() -> None:
    runtime = Recorder()
    session = BmodelSession(runtime, manifest())
    out = session.prefill([11, 12, 13])
    names = [net for net, _ in runtime.calls]
    assert names == ["embedding", "block_0", "block_1", "lm_head"]
    ids = runtime.calls[0][1]["input_ids"]
    assert ids.tolist() == [[11, 12, 13, 0, 0, 0, 0, 0]]
    block = runtime.calls[1][1]
    assert block["position_ids"].tolist() == [[0, 1, 2, 0, 0, 0, 0, 0]]
    mask = block["attention_mask"][0, 0]
    visible = mask == 0
    assert visible[:3, :3].tolist() == np.tril(np.ones((3, 3), bool)).tolist()
    assert not visible[:3, 3:].any() and not visible[3:].any()
    assert (mask[~visible] == MASKED).all()
    assert out.tolist() == list(range(2 * HIDDEN, 3 * HIDDEN))  # position 2's hidden state
    assert session.length == 3


def test_decode_attends_to_the_history_rows_and_writes_its_own_at_its_position() -> None:
    runtime = Recorder()
    session = BmodelSession(runtime, manifest())
    session.prefill([11, 12, 13])
    runtime.calls.clear()
    session.decode(14)
    session.decode(15)
    first = runtime.calls[1][1]  # block_cache_0 of the first decode
    assert first["position_ids"].tolist() == [[3]]
    mask = first["attention_mask"].reshape(-1)
    assert mask.tolist() == [0, 0, 0] + [int(MASKED)] * (SEQLEN - 3) + [0]
    assert first["history_k"][0, :, 0, 0].tolist() == [100, 101, 102, 0, 0, 0, 0, 0]
    second = runtime.calls[1 + LAYERS + 2][1]  # block_cache_0 of the second decode
    assert second["history_k"][0, :, 0, 0].tolist() == [100, 101, 102, 103, 0, 0, 0, 0]
    assert second["history_v"][0, :5, 1, 2].tolist() == [200, 201, 202, 203, 0]
    assert session.length == 5


def test_a_prompt_or_a_sequence_past_seqlen_is_refused_naming_the_limit() -> None:
    session = BmodelSession(Recorder(), manifest())
    with pytest.raises(InvalidRequestError, match="SEQLEN is 8"):
        session.prefill(list(range(SEQLEN)))
    session.prefill(list(range(SEQLEN - 1)))
    session.decode(1)
    with pytest.raises(InvalidRequestError, match="reached this bmodel's SEQLEN of 8"):
        session.decode(2)


def test_a_batched_decode_steps_two_slots_in_one_call_each_at_its_own_position() -> None:
    runtime = Recorder()
    group = SlotGroup(runtime, manifest(batch=2))
    group.prefill(0, [11, 12, 13])
    group.prefill(1, [21, 22])
    runtime.calls.clear()
    out = group.decode({0: 14, 1: 23})
    names = [net for net, _ in runtime.calls]
    assert names == ["embedding_cache", "embedding_cache", "block_cache_0", "block_cache_1",
                     "lm_head", "lm_head"]
    block = runtime.calls[2][1]
    assert block["position_ids"].tolist() == [[3], [2]]
    mask = block["attention_mask"].reshape(2, -1)
    assert mask[0].tolist() == [0, 0, 0] + [int(MASKED)] * (SEQLEN - 3) + [0]
    assert mask[1].tolist() == [0, 0] + [int(MASKED)] * (SEQLEN - 2) + [0]
    # Each slot's rows: its prompt's keys, then the decoded token's at its own position.
    second = runtime.calls[3][1]["history_k"]
    assert second[0, :4, 0, 0].tolist() == [100, 101, 102, 0]  # row 3 arrives after layer 1
    assert group.lengths == [4, 3]
    keys = runtime.calls[2][1]["history_k"]
    assert keys[1, :3, 1, 2].tolist() == [100, 101, 0]
    assert out[0].tolist() == [3] * HIDDEN and out[1].tolist() == [2] * HIDDEN
    runtime.calls.clear()
    group.decode({1: 24})  # one slot alone: the other's row is masked and left untouched
    block = runtime.calls[1][1]
    assert block["position_ids"].tolist() == [[0], [3]]
    assert block["attention_mask"].reshape(2, -1)[0, :SEQLEN].tolist() == [int(MASKED)] * SEQLEN
    assert block["history_k"][1, :4, 0, 0].tolist() == [100, 101, 102, 0]
    assert block["history_k"][0, :4, 0, 0].tolist() == [100, 101, 102, 103]
    assert group.lengths == [4, 4]
