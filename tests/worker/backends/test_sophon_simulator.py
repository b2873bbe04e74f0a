"""A compiled bmodel on Sophgo's BM1684X C-model simulator, driven by npuserve's one protocol
(prefill, then decode against the slot's KV rows), against the transformers reference on the
same bfloat16 weights (make test-bm1684x)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.worker.conftest import compiled_tiny, greedy_alone
from worker.backends.sophon.protocol import BmodelSession
from worker.backends.sophon.simulator import SimulatorRuntime
from worker.checkpoints.tpu_toolchain import require_toolchain

pytestmark = pytest.mark.bm1684x
SEQLEN = 64
PROMPT = [5, 77, 301, 12, 999, 400, 8, 64, 123, 7, 512, 42]


@pytest.fixture(scope="module", params=[("qwen2", "bf16"), ("qwen3", "w8bf16")],
                ids=["qwen2-bf16", "qwen3-w8bf16"])
def compiled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[Path, dict[str, Any], SimulatorRuntime]]:
    arch, quant = request.param
    source, bmodel, manifest = compiled_tiny(arch, seqlen=SEQLEN, quant=quant)
    runtime = SimulatorRuntime(bmodel / manifest["bmodel"], require_toolchain())
    yield source, manifest, runtime
    runtime.close()


def reference_logits(source: Path, tokens: list[int]) -> np.ndarray:
    """transformers on the weights the converter saw (bfloat16), computed in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).float().eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()  # [T, V]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_prefill_and_decode_on_the_simulator_match_transformers(
        compiled: tuple[Path, dict[str, Any], SimulatorRuntime]) -> None:
    source, manifest, runtime = compiled
    session = BmodelSession(runtime, manifest)
    tokens = list(PROMPT)
    outputs = [session.prefill(tokens)]
    for _ in range(6):  # teacher-forced: feed the reference's greedy token
        tokens.append(int(reference_logits(source, tokens)[-1].argmax()))
        outputs.append(session.decode(tokens[-1]))
    reference = reference_logits(source, tokens)[len(PROMPT) - 1:]
    cosines = [cosine(ours, ref) for ours, ref in zip(outputs, reference, strict=True)]
    print(f"{manifest['quant']}: logit cosine per step {np.round(cosines, 5).tolist()}")
    assert min(cosines) >= 0.999
    assert [int(o.argmax()) for o in outputs] == [int(r.argmax()) for r in reference]
    assert session.length == len(tokens)


def test_the_engine_serves_more_requests_than_slots_each_as_if_alone(
        compiled: tuple[Path, dict[str, Any], SimulatorRuntime]) -> None:
    from common.config import EngineConfig
    from common.sampling_params import SamplingParams
    from worker.backends.sophon.backend import SophonBackend
    from worker.backends.sophon.settings import SophonSettings
    from worker.engine.engine import Engine

    source, manifest, runtime = compiled
    bmodel_dir = runtime.bmodel.parent
    settings = SophonSettings(pool_size=2, tpu_mlir_venv=str(require_toolchain().venv))
    backend = SophonBackend(bmodel_dir, EngineConfig(max_num_seqs=4), settings)
    try:
        assert (backend.capacity.max_batch, backend.capacity.block_size) == (2, SEQLEN)
        engine = Engine(backend)
        prompts = [PROMPT, PROMPT[:5], PROMPT[3:]]
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        done = engine.generate(prompts, params)
        # Each request alone in one session of the same bmodel: the pool, the slot a request
        # is given and the requests sharing steps change nothing.
        for prompt, completion in zip(prompts, done, strict=True):
            assert completion.token_ids == greedy_alone(runtime, manifest, prompt, 4)
        assert engine.scheduler.blocks.num_free_blocks == 2
    finally:
        backend.close()


def test_verify_compares_a_bmodel_on_the_simulator_with_its_source(
        compiled: tuple[Path, dict[str, Any], SimulatorRuntime]) -> None:
    from worker.quant.prompts import EvalText
    from worker.quant.verify import compare

    source, manifest, runtime = compiled
    texts = [EvalText("en", "The quick brown fox jumps over the lazy dog.", "en", "prose"),
             EvalText("zh", "通义千问是一个大语言模型。", "zh", "prose")]
    result = compare(runtime.bmodel.parent, source, texts, threshold=0.98, progress=False)
    print(f"verify {manifest['quant']}: {result.overall}")
    assert result.passed and result.overall["cosine_mean"] >= 0.999
    assert result.overall["top1_agreement"] >= 0.9
    assert result.quantization == {"bmodel": manifest["quant"], "chip": "bm1684x",
                                   "seqlen": SEQLEN}


def test_the_top1_head_on_chip_picks_what_the_host_picks_and_refuses_sampling() -> None:
    from common.config import EngineConfig
    from common.errors import InvalidRequestError
    from common.sampling_params import SamplingParams
    from worker.backends.sophon.backend import SophonBackend
    from worker.backends.sophon.settings import SophonSettings
    from worker.engine.engine import Engine

    _, host_dir, host_manifest = compiled_tiny("qwen2", seqlen=SEQLEN, quant="bf16")
    _, chip_dir, chip_manifest = compiled_tiny("qwen2", seqlen=SEQLEN, quant="bf16",
                                               sample_on_host=False)
    assert chip_manifest["nets"]["lm_head"]["outputs"][0]["shape"] == [1, 1]
    toolchain = require_toolchain()
    backend = SophonBackend(chip_dir, EngineConfig(max_num_seqs=2),
                            SophonSettings(pool_size=2, tpu_mlir_venv=str(toolchain.venv)))
    host = SimulatorRuntime(host_dir / host_manifest["bmodel"], toolchain)
    try:
        engine = Engine(backend)
        prompts = [PROMPT, PROMPT[:5], PROMPT[3:]]
        done = engine.generate(prompts, SamplingParams(max_tokens=5, temperature=0.0,
                                                       ignore_eos=True))
        for prompt, completion in zip(prompts, done, strict=True):
            assert completion.token_ids == greedy_alone(host, host_manifest, prompt, 5)
        with pytest.raises(InvalidRequestError, match="temperature"):
            engine.add_request(PROMPT, SamplingParams(temperature=0.7))
    finally:
        backend.close()
        host.close()


def test_batched_decode_nets_step_two_sequences_exactly_as_two_batch1_steps() -> None:
    import time

    from common.config import EngineConfig
    from common.sampling_params import SamplingParams
    from worker.backends.sophon.backend import SophonBackend
    from worker.backends.sophon.protocol import SlotGroup
    from worker.backends.sophon.settings import SophonSettings
    from worker.engine.engine import Engine

    toolchain = require_toolchain()
    _, one_dir, one = compiled_tiny("qwen2", seqlen=SEQLEN, quant="bf16")
    _, two_dir, two = compiled_tiny("qwen2", seqlen=SEQLEN, quant="bf16", decode_batch=2)
    assert two["decode_batch"] == 2
    single = SimulatorRuntime(one_dir / one["bmodel"], toolchain)
    batched = SimulatorRuntime(two_dir / two["bmodel"], toolchain)
    try:
        prompts = [PROMPT, PROMPT[3:8]]
        alone = [BmodelSession(single, one) for _ in prompts]
        group = SlotGroup(batched, two)
        tokens = []
        for place, (session, prompt) in enumerate(zip(alone, prompts, strict=True)):
            first = session.prefill(prompt)
            np.testing.assert_array_equal(group.prefill(place, prompt), first)
            tokens.append(int(first.argmax()))
        spent = {"batch-1": 0.0, "batched": 0.0}
        for _ in range(4):
            start = time.perf_counter()
            expected = [s.decode(t) for s, t in zip(alone, tokens, strict=True)]
            spent["batch-1"] += time.perf_counter() - start
            start = time.perf_counter()
            got = group.decode(dict(enumerate(tokens)))
            spent["batched"] += time.perf_counter() - start
            for place, row in enumerate(expected):
                np.testing.assert_array_equal(got[place], row)  # bit for bit
            tokens = [int(row.argmax()) for row in expected]
        print(f"4 decode steps of 2 sequences on the simulator: two batch-1 calls "
              f"{spent['batch-1']:.1f}s, one batched call {spent['batched']:.1f}s")
        backend = SophonBackend(two_dir, EngineConfig(max_num_seqs=2),
                                SophonSettings(pool_size=2, tpu_mlir_venv=str(toolchain.venv)),
                                runtime=batched)
        done = Engine(backend).generate(prompts + [PROMPT[:4]], SamplingParams(
            max_tokens=4, temperature=0.0, ignore_eos=True))
        for prompt, completion in zip(prompts + [PROMPT[:4]], done, strict=True):
            assert completion.token_ids == greedy_alone(single, one, prompt, 4)
    finally:
        single.close()
        batched.close()


def test_verify_answers_come_from_the_bmodel_on_the_simulator(tmp_path: Path) -> None:
    import json
    import shutil

    from preprocess.tokenizer import load_tokenizer, render_chat
    from worker.quant.answers import greedy_answers

    _, cached, manifest = compiled_tiny("qwen2", seqlen=SEQLEN, quant="bf16")
    bmodel_dir = shutil.copytree(cached, tmp_path / "bmodel")
    config = json.loads((bmodel_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    (bmodel_dir / "tokenizer_config.json").write_text(json.dumps(config))
    questions = ["What is two plus two?", "Name a colour. " * 30]
    answers = greedy_answers(bmodel_dir, questions, max_tokens=6)
    tokenizer = load_tokenizer(bmodel_dir)
    ids = tokenizer(render_chat(tokenizer, [{"role": "user", "content": questions[0]}]),
                    add_special_tokens=False).input_ids
    runtime = SimulatorRuntime(bmodel_dir / manifest["bmodel"], require_toolchain())
    try:
        expected = greedy_alone(runtime, manifest, list(ids), 6)
    finally:
        runtime.close()
    eos = 2  # the tiny checkpoints' </s>: generation stops there
    expected = expected[:expected.index(eos)] if eos in expected else expected
    assert answers[0] == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert "leave no room in a context of 64" in answers[1]
