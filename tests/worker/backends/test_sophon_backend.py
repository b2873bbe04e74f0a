"""The sophon backend in the engine, without a toolchain: its card path over the recorded
simulator run, a slot whose device call fails (reset, the others untouched), and a bmodel
that picks its token on the chip (greedy only, the rest refused)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.config import EngineConfig
from common.errors import DeviceError, InvalidRequestError
from common.sampling_params import SamplingParams
from tests.worker.backends import sail_standin
from tests.worker.backends.record_sophon_fixture import MANIFEST
from tests.worker.backends.test_sophon_replay import Replay
from worker.backends.base import OutputKind
from worker.backends.sophon.backend import GREEDY_ONLY, SophonBackend
from worker.backends.sophon.card import SailRuntime
from worker.backends.sophon.protocol import HostRuntime
from worker.backends.sophon.settings import SophonSettings
from worker.checkpoints.bmodel import MANIFEST as MANIFEST_NAME
from worker.engine.engine import Engine

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
CHIP_TOKEN = 7


def bmodel_dir(path: Path, sample_on_host: bool = True, decode_batch: int = 1) -> Path:
    """A compiled-model directory as `npuserve model bmodel` writes it, for the recorded net
    table (the bmodel file itself is never opened: the runtime is given)."""
    from transformers import Qwen2Config

    recorded = json.loads(MANIFEST.read_text())
    Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                eos_token_id=2).save_pretrained(path)
    manifest = {**recorded, "bmodel": "tiny.bmodel", "sample_on_host": sample_on_host,
                "device_mem_bytes": 1 << 20}
    if not sample_on_host:
        manifest["nets"]["lm_head"]["outputs"] = [
            {"name": "token", "shape": [1, 1], "dtype": "int32"}]
    for name, net in manifest["nets"].items():
        if name.startswith("block_cache_"):
            for tensor in net["inputs"] + net["outputs"]:
                tensor["shape"][0] = decode_batch
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    return path


class Shapes(HostRuntime):
    """Answers every net with zeros of its declared shapes (lm_head: the chip's token, or
    logits peaking at it) and fails the calls it is told to."""

    def __init__(self, nets: Mapping[str, Any]) -> None:
        self.nets = nets
        self.fail: list[str] = []
        self.calls: list[str] = []

    def run(self, net: str, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        self.calls.append(net)
        if net in self.fail:
            self.fail.remove(net)
            raise DeviceError(f"net {net} failed on the BM1684X simulator: injected")
        spec = self.nets.get(net) or self.nets[net.rsplit("_", 1)[0] + "_0"]
        out = {t["name"]: np.zeros(t["shape"], np.int32 if t["dtype"] == "int32"
                                   else np.float32 if t["dtype"] == "float32" else np.uint16)
               for t in spec["outputs"]}
        if net == "lm_head":
            row = next(iter(out.values()))
            row.reshape(-1)[0 if row.dtype == np.int32 else CHIP_TOKEN] = (
                CHIP_TOKEN if row.dtype == np.int32 else 1.0)
        return out


def test_the_engine_on_the_card_path_generates_the_recorded_tokens(tmp_path: Path) -> None:
    model = bmodel_dir(tmp_path)
    recorded = json.loads(MANIFEST.read_text())
    replay = Replay()
    runtime = SailRuntime("tiny.bmodel", 0, sail=sail_standin.module(recorded["nets"],
                                                                       replay.run))
    backend = SophonBackend(model, EngineConfig(max_num_seqs=2),
                            SophonSettings(sophon_device="0", pool_size=2), runtime=runtime)
    assert backend.device == "bm1684x:0" and backend.capacity.max_batch == 2
    [done] = Engine(backend).generate([recorded["prompt"]], GREEDY)
    assert done.token_ids == recorded["tokens"]
    stats = backend.device_stats()
    assert stats is not None and stats.memory_total_bytes == 16384 << 20


def test_a_failing_slot_is_reset_and_the_other_slot_runs_on(tmp_path: Path) -> None:
    model = bmodel_dir(tmp_path)
    runtime = Shapes(json.loads(MANIFEST.read_text())["nets"])
    backend = SophonBackend(model, EngineConfig(max_num_seqs=2),
                            SophonSettings(pool_size=2), runtime=runtime)
    engine = Engine(backend)
    engine.add_request([5, 6, 7], GREEDY, "a")
    engine.add_request([8, 9], GREEDY, "b")
    assert len(engine.step()) == 2 and engine.failed == {}  # both prefills
    runtime.fail.append("block_cache_1")  # the first decode of this step: a's
    events = engine.step()
    assert [e.request_id for e in events] == ["b"]
    assert list(engine.failed) == ["a"] and "block_cache_1" in engine.failed["a"]
    assert engine.scheduler.get("a") is None
    group, place = backend.slots[0]
    assert group.lengths[place] == 0 and backend.slots[1][0].lengths[0] == 3
    # b finishes untouched; a resumes on a fresh slot from what it had published.
    engine.add_request([5, 6, 7], GREEDY, "a", output_ids=[CHIP_TOKEN])
    finished = {e.request_id for events in engine.steps() for e in events
                if e.finish_reason is not None}
    assert finished == {"a", "b"} and engine.failed == {}


def test_a_bmodel_with_the_top1_head_on_chip_serves_greedy_and_refuses_the_rest(
        tmp_path: Path) -> None:
    model = bmodel_dir(tmp_path, sample_on_host=False)
    runtime = Shapes(json.loads((model / MANIFEST_NAME).read_text())["nets"])
    backend = SophonBackend(model, EngineConfig(), SophonSettings(pool_size=1),
                            runtime=runtime)
    assert backend.capacity.output == OutputKind.TOKENS
    assert backend.capabilities == GREEDY_ONLY
    assert EngineConfig().enable_prefix_caching and not backend.capacity.prefix_caching
    engine = Engine(backend)
    [done] = engine.generate([[5, 6, 7]], GREEDY)
    assert done.token_ids == [CHIP_TOKEN] * GREEDY.max_tokens
    for params, field in ((SamplingParams(), "temperature"),
                          (SamplingParams(temperature=0.0, top_k=5), "top_k"),
                          (SamplingParams(temperature=0.0, seed=3), "seed"),
                          (SamplingParams(temperature=0.0, logprobs=True), "logprobs"),
                          (SamplingParams(temperature=0.0, repetition_penalty=1.2),
                           "repetition_penalty")):
        with pytest.raises(InvalidRequestError, match=field):
            engine.add_request([5, 6], params)
    assert GREEDY_ONLY.lacking != 0


def test_with_batched_decode_nets_a_step_decodes_the_group_in_one_call_per_layer(
        tmp_path: Path) -> None:
    model = bmodel_dir(tmp_path, decode_batch=2)
    runtime = Shapes(json.loads((model / MANIFEST_NAME).read_text())["nets"])
    backend = SophonBackend(model, EngineConfig(max_num_seqs=3), SophonSettings(pool_size=3),
                            runtime=runtime)
    assert [g.batch for g in backend.groups] == [2, 2] and backend.capacity.max_batch == 4
    engine = Engine(backend)
    for rid, prompt in (("a", [5, 6, 7]), ("b", [8, 9]), ("c", [10])):
        engine.add_request(prompt, GREEDY, rid)
    engine.step()  # three prefills
    runtime.calls.clear()
    assert len(engine.step()) == 3
    # a and b share the first group (one call per layer), c is alone in the second.
    assert runtime.calls.count("block_cache_0") == 2
    assert runtime.calls.count("embedding_cache") == runtime.calls.count("lm_head") == 3
    runtime.fail.append("block_cache_1")  # the first group's call: a and b fail together
    events = engine.step()
    assert [e.request_id for e in events] == ["c"] and set(engine.failed) == {"a", "b"}
    assert backend.groups[0].lengths == [0, 0] and backend.groups[1].lengths[0] == 3
