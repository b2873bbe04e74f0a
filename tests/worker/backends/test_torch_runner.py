"""The torch model runner's public interface: what the backend, quantization and
verification call."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import InvalidRequestError, ModelConfigError
from common.sampling_params import SamplingParams
from worker.backends.base import SequenceChunk
from worker.backends.torch_runner import ModelRunner
from worker.backends.torch_settings import TorchSettings
from worker.kernels.cpu import cpu_kernels
from worker.kernels.cpu_ops import KernelOps
from worker.model.linear import Projection, native_bf16
from worker.model.ops import DecoderOps
from worker.quant.runner import load_runner

PARAMS = SamplingParams()


@pytest.fixture(scope="module")
def runner(tiny_qwen3: Path) -> ModelRunner:
    return ModelRunner(tiny_qwen3, TorchSettings(kv_cache_gb=0.02), max_num_seqs=4)


def test_the_cache_takes_the_op_sets_layout_and_default_block_size(runner: ModelRunner) -> None:
    cfg = runner.model_config
    assert runner.block_size == runner.ops.default_block_size
    assert runner.cache.data.shape == runner.ops.kv_cache_shape(
        cfg.num_hidden_layers, runner.num_blocks, runner.block_size, cfg.num_key_value_heads,
        cfg.head_dim)
    per_block = runner.ops.kv_cache_bytes_per_block(cfg, runner.block_size, runner.dtype)
    assert runner.kv_cache_bytes() == runner.num_blocks * per_block
    assert runner.max_seq_len <= runner.num_blocks * runner.block_size


def test_a_block_size_setting_overrides_the_op_sets_default(tiny_qwen3: Path) -> None:
    small = ModelRunner(tiny_qwen3, TorchSettings(kv_cache_gb=0.01, block_size=4))
    assert small.block_size == small.cache.block_size == 4


def test_the_cache_holds_no_more_than_max_num_seqs_full_sequences(tiny_qwen3: Path) -> None:
    capped = ModelRunner(tiny_qwen3, TorchSettings(kv_cache_gb=1.0), max_model_len=64,
                         max_num_seqs=2)
    assert capped.num_blocks == 2 * math.ceil(64 / capped.block_size)
    assert capped.max_seq_len == 64


def test_prepare_lays_out_decodes_first_and_names_the_rows_to_sample(tiny_qwen3: Path) -> None:
    # the per-operator path's layout: without the CPU kernels there is no one-call step,
    # which takes a step this short as rows wherever the machine's dispatch table lets it
    runner = ModelRunner(tiny_qwen3, TorchSettings(kv_cache_gb=0.02, cpu_kernels=False),
                         max_num_seqs=4)
    assert runner.plan is None
    bs = runner.block_size
    chunks = [SequenceChunk("p", [5, 6, 7], 0, [3], True, PARAMS),
              SequenceChunk("d", [9], bs + 2, [1, 2], True, PARAMS),
              SequenceChunk("q", [8, 8], 4, [4], False, PARAMS)]
    step = runner.prepare(chunks)
    assert step.ids.tolist() == [9, 5, 6, 7, 8, 8]
    assert step.positions.tolist() == [bs + 2, 0, 1, 2, 4, 5]
    assert step.meta.slot_mapping.tolist() == [2 * bs + 2, 3 * bs, 3 * bs + 1, 3 * bs + 2,
                                               4 * bs + 4, 4 * bs + 5]
    assert step.meta.num_decodes == 1
    assert [(s.start, s.end) for s in step.meta.prefills] == [(1, 4), (4, 6)]
    assert step.meta.prefills[0].context is None  # a fresh prompt attends to itself
    assert step.meta.prefills[1].context is not None  # a later chunk reads the cache
    assert step.sample_rows == [3, 0]  # in the chunks' order: "p" ends at row 3, "d" is row 0


def test_teacher_forced_hidden_states_give_the_logits_a_step_samples(
        runner: ModelRunner) -> None:
    ids = list(range(200, 230))
    every = runner.logits(runner.prefill_hidden_states(ids))  # [30, vocab]
    assert every.shape == (30, runner.model_config.vocab_size) and every.dtype == torch.float32
    last = runner.execute([SequenceChunk("a", ids, 0, [0, 1], True, PARAMS)])
    assert last is not None
    torch.testing.assert_close(last[0], every[-1], rtol=1e-4, atol=1e-4)
    assert runner.execute([SequenceChunk("a", ids[:4], 0, [0], False, PARAMS)]) is None


def test_a_chunk_after_cached_context_matches_the_whole_prompt_at_once(
        runner: ModelRunner) -> None:
    ids = list(range(300, 340))
    whole = runner.logits(runner.prefill_hidden_states(ids))
    table = [5, 7, 6]  # scattered blocks
    runner.execute([SequenceChunk("b", ids[:25], 0, table, False, PARAMS)])
    tail = runner.execute([SequenceChunk("b", ids[25:], 25, table, True, PARAMS)])
    assert tail is not None
    torch.testing.assert_close(tail[0], whole[-1], rtol=1e-4, atol=1e-4)


def test_a_text_longer_than_the_runner_holds_is_refused(tiny_qwen3: Path) -> None:
    sized = load_runner(tiny_qwen3, 20)
    assert sized.max_seq_len >= 20
    with pytest.raises(ValueError, match="longer than"):
        sized.prefill_hidden_states(list(range(sized.max_seq_len + 1)))


def test_weight_counts_are_the_runners_weights(runner: ModelRunner) -> None:
    assert runner.weight_bytes() == runner.weights.nbytes_per_decode_step()
    assert runner.weight_memory_bytes() >= runner.weight_bytes()


def test_a_bfloat16_model_runs_its_small_projections_on_the_kernel(tiny_model_dir) -> None:
    """Decode-sized calls on npuserve's bfloat16 kernel, longer prefills as the dispatch table
    routes them (oneDNN where the CPU has native bfloat16, PyTorch's GEMM widened to float32
    elsewhere, or the kernel): the same hidden states as PyTorch's operators throughout, to
    bfloat16 rounding."""
    from worker.model.linear import AMX_KERNEL_ROWS, BF16_KERNEL_ROWS

    model = tiny_model_dir("qwen3")
    with_kernel = ModelRunner(model, TorchSettings(kv_cache_gb=0.02, dtype="bfloat16"))
    without = ModelRunner(model, TorchSettings(kv_cache_gb=0.02, dtype="bfloat16",
                                               cpu_kernels=False))
    assert with_kernel.weights.layers[0].qkv._bf16_kernels is not None
    assert without.weights.layers[0].qkv._bf16_kernels is None
    lm_head = with_kernel.weights.lm_head
    assert isinstance(lm_head, Projection)
    assert with_kernel.dispatch is not None and without.dispatch is None
    assert with_kernel.plan is not None and without.plan is None
    # activations in float32 on the kernels' ops, on every CPU
    assert type(with_kernel.ops) is KernelOps and with_kernel.activation_dtype == torch.float32
    assert type(without.ops) is DecoderOps and without.activation_dtype == torch.bfloat16
    for ids in (list(range(40, 40 + BF16_KERNEL_ROWS)), list(range(40, 70)),
                list(range(40, 41 + AMX_KERNEL_ROWS))):
        ours = with_kernel.prefill_hidden_states(ids).float()
        ref = without.prefill_hidden_states(ids).float()
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        assert float((ours - ref).abs().max() / ref.abs().max()) < 3e-2


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])  # q/k norms; q/k/v biases
@pytest.mark.parametrize("native", [False, None], ids=["widened", "this-cpu"])
def test_bfloat16_carries_float32_activations(
        tiny_model_dir, arch: str, native: bool | None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 model runs on the kernels' op set: weights and KV cache in bfloat16,
    activations, norms and rotary tables in float32, on every CPU (`widened` routes it as on
    a CPU without native bfloat16: no packed copy, PyTorch's float32 GEMM on W widened past the
    kernel). Where the kernel widens W too (no AVX512-BF16 or AMX), over prompts the one-call
    step, the kernel and the widened GEMM serve, its hidden states are those of a float32
    model holding the same weights with a bfloat16 KV cache, to float rounding, and so follow
    the float32 cache's several times closer than PyTorch's bfloat16 operators do. Where the
    CPU multiplies bfloat16, x is rounded to bfloat16 for vdpbf16ps, AMX tiles and oneDNN's
    bfloat16 GEMM, and the float32 model's states are still followed closer than PyTorch's
    bfloat16 operators follow them."""
    kernels = cpu_kernels()
    assert kernels is not None
    multiplies_bf16 = native_bf16(kernels)  # this CPU's, whatever the routing
    if native is not None:
        monkeypatch.setattr("worker.model.linear.native_bf16", lambda kernels: native)
    stored = {"bfloat16": tmp_path / "bf16", "float32": tmp_path / "f32"}  # the same weights
    weights = load_file(tiny_model_dir(arch) / "model.safetensors")
    for dtype, path in stored.items():
        shutil.copytree(tiny_model_dir(arch), path)
        save_file({k: v.bfloat16().to(getattr(torch, dtype)) for k, v in weights.items()},
                  path / "model.safetensors")
    ours, pytorchs = (ModelRunner(stored["bfloat16"], TorchSettings(
        kv_cache_gb=0.02, dtype="bfloat16", cpu_kernels=kernels)) for kernels in (True, False))
    f32_bf16_cache, f32 = (ModelRunner(stored["float32"], TorchSettings(
        kv_cache_gb=0.02, kv_cache_dtype=kv)) for kv in ("bfloat16", "auto"))
    assert type(ours.ops) is KernelOps and ours.activation_dtype == torch.float32
    layer = ours.weights.layers[0]
    assert layer.input_norm.dtype == ours.rope.cos.dtype == torch.float32
    assert ours.weights.lm_head.weight.dtype == ours.cache.data.dtype == torch.bfloat16
    assert ours.plan is not None
    for n in (5, 30, 150):
        ids = list(range(40, 40 + n))
        got = ours.prefill_hidden_states(ids)
        assert got.dtype == torch.float32
        want = f32.prefill_hidden_states(ids)
        theirs = rel_err(pytorchs.prefill_hidden_states(ids), want)
        if multiplies_bf16:
            assert rel_err(got, want) < theirs, n
            continue
        # a key rounded the other way in the cache moves a few elements by its rounding;
        # which GEMM each runner's timed dispatch table picked (summing in other orders)
        # decides which keys: 0.4-1.4e-4 between tables timed on one Xeon
        assert rel_err(got, f32_bf16_cache.prefill_hidden_states(ids)) < 3e-4, n
        assert rel_err(got, want) < theirs / 2, n


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def decode_steps(batch: int, new_table: list[int]) -> list[list[SequenceChunk]]:
    """`batch` prompts prefilled, four decode steps, then a decode step beside a new 40-token
    prompt (blocks `new_table`)."""
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, 1000, (10 + 3 * i,), generator=g).tolist() for i in range(batch)]
    tables = [[2 * i, 2 * i + 1, 2 * i + 16] for i in range(batch)]
    steps = [[SequenceChunk(str(i), p, 0, tables[i], True, PARAMS)
              for i, p in enumerate(prompts)]]
    for t in range(4):
        steps.append([SequenceChunk(str(i), [100 + 7 * t + i], len(p) + t, tables[i], True,
                                    PARAMS) for i, p in enumerate(prompts)])
    steps.append([*(SequenceChunk(str(i), [9], len(p) + 4, tables[i], True, PARAMS)
                    for i, p in enumerate(prompts)),
                  SequenceChunk("new", list(range(300, 340)), 0, new_table, True, PARAMS)])
    return steps


@pytest.mark.parametrize("batch", [1, 6])
def test_bfloat16_decode_steps_follow_pytorchs_bfloat16_operators(tiny_model_dir,
                                                                   batch: int) -> None:
    """Decode steps run as one call (float32 activations over bfloat16 weights and cache), a
    step that also prefills on PyTorch's operators with the kernels' attention: step after
    step, the logits stay within bfloat16's rounding of PyTorch's bfloat16 operators."""
    model = tiny_model_dir("qwen3")
    runners = [ModelRunner(model, TorchSettings(kv_cache_gb=0.02, dtype="bfloat16",
                                                cpu_kernels=kernels), max_num_seqs=8)
               for kernels in (True, False)]
    plan = runners[0].plan
    assert plan is not None and plan.max_rows >= batch and runners[1].plan is None
    for chunks in decode_steps(batch, new_table=[40, 41, 42]):
        ours, ref = (r.execute(chunks) for r in runners)
        assert ours is not None and ref is not None
        err = float((ours - ref).norm() / ref.norm())
        assert err < 3e-2, err


@pytest.mark.parametrize("batch", [1, 6])
def test_a_bfloat16_kv_cache_follows_the_float32_one(tiny_model_dir, batch: int) -> None:
    """--kv-cache-dtype bfloat16 for a float32 model: half the bytes a block; one-call decode
    steps, a step that decodes beside a prefill on the per-operator path, and a chunk that
    reads its cached context back stay within bfloat16's rounding of the float32 cache."""
    model = tiny_model_dir("qwen3")
    ours, ref = (ModelRunner(model, TorchSettings(kv_cache_gb=0.02, kv_cache_dtype=kv,
                                                  cpu_dispatch=False),  # a plan of 16 rows
                             max_num_seqs=8) for kv in ("bfloat16", "auto"))
    assert ours.kv_dtype == ours.cache.data.dtype == torch.bfloat16
    assert ref.kv_dtype == ref.cache.data.dtype == torch.float32
    assert 2 * ours.kv_cache_bytes() // ours.num_blocks == ref.kv_cache_bytes() // ref.num_blocks
    assert ours.plan is not None and ours.plan.max_rows >= batch
    steps = decode_steps(batch, new_table=[40, 41, 42, 43])
    steps.append([SequenceChunk("new", list(range(340, 350)), 40, [40, 41, 42, 43], True,
                                PARAMS)])
    for chunks in steps:
        got, want = ours.execute(chunks), ref.execute(chunks)
        assert got is not None and want is not None
        err = float((got - want).norm() / want.norm())
        assert 0 < err < 1e-2, err  # rounded, and only by the cache's rounding


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_short_steps_with_prefill_run_in_one_call(tiny_model_dir, dtype: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of few tokens, a prefill chunk among them (a new prompt beside decodes, then its
    next chunk after cached context), runs as the one-call step, each token a row attending
    to its sequence up to itself: the logits of the per-operator path, to rounding."""
    model = tiny_model_dir("qwen3")
    ours, ref = (ModelRunner(model, TorchSettings(kv_cache_gb=0.02, dtype=dtype,
                                                  cpu_dispatch=False), max_num_seqs=8)
                 for _ in range(2))
    assert ours.plan is not None
    ref.plan = None
    calls: list[int] = []
    plan_forward = ours.plan.forward
    monkeypatch.setattr(ours.plan, "forward", lambda ids, positions, meta: (
        calls.append(ids.shape[0]), plan_forward(ids, positions, meta))[1])
    rows = ours.plan.max_rows
    prompts = [list(range(20, 20 + rows)), list(range(60, 63))]  # one too long, one short
    tables = [[0, 1, 2, 3], [8, 9]]
    steps = [[SequenceChunk(str(i), p, 0, tables[i], True, PARAMS)
              for i, p in enumerate(prompts)]]
    for t in range(2):
        steps.append([SequenceChunk(str(i), [100 + t + i], len(p) + t, tables[i], True,
                                    PARAMS) for i, p in enumerate(prompts)])
    new = list(range(200, 200 + rows - 2 + 5))
    steps.append([*(SequenceChunk(str(i), [9], len(p) + 2, tables[i], True, PARAMS)
                    for i, p in enumerate(prompts)),
                  SequenceChunk("new", new[:rows - 2], 0, [20, 21, 22], False, PARAMS)])
    steps.append([SequenceChunk("new", new[rows - 2:], rows - 2, [20, 21, 22], True, PARAMS)])
    tol = 1e-4 if dtype == "float32" else 3e-2
    for chunks in steps:
        got, want = ours.execute(chunks), ref.execute(chunks)
        assert got is not None and want is not None
        assert float((got - want).norm() / want.norm()) < tol
    # the long prompt's step goes per operator; the decodes, the step with the new prompt's
    # first chunk beside them and its last chunk go in one call
    assert calls == [2, 2, rows, 5]


def test_a_bfloat16_kv_cache_needs_the_cpu_kernels(tiny_model_dir) -> None:
    with pytest.raises(ModelConfigError, match="kv-cache-dtype bfloat16 needs a float32 model "
                                               "on the CPU kernels"):
        ModelRunner(tiny_model_dir("qwen3"), TorchSettings(
            kv_cache_gb=0.02, kv_cache_dtype="bfloat16", cpu_kernels=False))
    bf16 = ModelRunner(tiny_model_dir("qwen3"), TorchSettings(
        kv_cache_gb=0.02, dtype="bfloat16", kv_cache_dtype="bfloat16"))
    assert bf16.kv_dtype == torch.bfloat16  # its own already
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype"):
        TorchSettings(kv_cache_dtype="fp8")


def test_bfloat16_heads_the_kernels_cannot_take_stay_on_pytorch(tmp_path: Path) -> None:
    """head_dim 12 (not a multiple of 8): attention and decode steps on PyTorch's operators,
    the small projections still on the bfloat16 kernel; decoding works."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    runner = ModelRunner(tmp_path, TorchSettings(kv_cache_gb=0.01, dtype="bfloat16"))
    assert type(runner.ops) is DecoderOps and runner.plan is None
    assert runner.weights.layers[0].qkv._bf16_kernels is not None
    runner.execute([SequenceChunk("a", [5, 6, 7], 0, [0], True, PARAMS)])
    logits = runner.execute([SequenceChunk("a", [8], 3, [0], True, PARAMS)])
    assert logits is not None and bool(torch.isfinite(logits).all())
