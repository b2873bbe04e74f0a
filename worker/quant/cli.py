"""`npuserve quantize` and `npuserve verify`. Heavy imports stay inside the handlers.

Exit status: 0 on success, 1 when `verify` finds the model below the threshold, 2 when the
input is wrong (a missing directory, an unsupported setting), with a message saying why.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from common.errors import NpuserveError
from worker.quant.scheme import QuantConfig, Scheme

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add `quantize` and `verify` to the root parser's subparsers."""
    q = subparsers.add_parser(
        "quantize",
        help="write an int8 copy of a model (w8a16 or w8a8), loadable by every npuserve command",
        description=(
            "Quantize every linear layer of the decoder to symmetric int8 with a scale per "
            "output channel (or per --group-size inputs), and save the result with its "
            "tokenizer as a new model directory. w8a8 also quantizes activations: per token at "
            "run time (--activations dynamic) or with scales calibrated on --calib prompts "
            "(--activations static). Check the result with `npuserve verify`."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    q.add_argument("--model", required=True, type=Path, help="float model directory")
    q.add_argument("--out", required=True, type=Path, help="output directory (replaced)")
    q.add_argument("--scheme", required=True, choices=("w8a16", "w8a8"),
                   help="w8a16: int8 weights, 16-bit activations; w8a8: int8 both")
    q.add_argument("--method", default="absmax", choices=("absmax", "percentile", "kl"),
                   help="how static activation ranges are chosen from the calibration "
                        "statistics (weights always use their absmax)")
    q.add_argument("--activations", choices=("dynamic", "static"),
                   help="w8a8 only: per-token scales at run time, or calibrated per-layer "
                        "scales (needs --calib); default dynamic")
    q.add_argument("--calib", type=Path, metavar="FILE",
                   help="calibration prompts (JSON Lines with \"text\", or one per line)")
    q.add_argument("--group-size", type=int, default=0, metavar="N",
                   help="input columns per weight scale; 0: one scale per output channel "
                        "(groups run int8 on the CPU kernels, elsewhere they are dequantized "
                        "on load; 64 keeps small models' answers closest)")
    q.add_argument("--lm-head", action="store_true",
                   help="quantize the output projection too (the largest matrix of small models)")
    q.add_argument("--embeddings", action="store_true",
                   help="store the embedding table in int8 (saves disk; dequantized on load)")
    q.add_argument("--threads", type=int, help="torch threads for calibration")
    q.add_argument("--format", choices=("npuserve", "msmodelslim"), default="npuserve",
                   help="npuserve's own layout, or msmodelslim's (what MindIE and vllm-ascend "
                        "load on Ascend; npuserve reads both everywhere). msmodelslim's w8a8 "
                        "has static activations: give --activations static --calib FILE")
    q.set_defaults(handler=_quantize)

    v = subparsers.add_parser(
        "verify",
        help="compare a model's logits with a reference model's on evaluation texts",
        description=(
            "Run both models teacher-forced over the same texts (default: English and Chinese "
            "questions, prose, code and long passages shipped with npuserve) and report, per "
            "position, the logits' cosine similarity (mean and minimum), top-1 agreement and "
            "KL(reference || model), and each model's perplexity. Exits 1 when the mean cosine "
            "similarity is below --threshold, naming what to try next."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    v.add_argument("--model", required=True, type=Path, help="model to check (e.g. quantized)")
    v.add_argument("--reference", required=True, type=Path, help="reference model directory")
    v.add_argument("--prompts", type=Path, metavar="FILE",
                   help="evaluation texts (JSON Lines with \"text\", or one per line); "
                        "default: the shipped set")
    v.add_argument("--threshold", type=float, default=0.98,
                   help="least mean cosine similarity that passes")
    v.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    v.add_argument("--answers", action="store_true",
                   help="also print both models' greedy answers to the set's demo questions")
    v.add_argument("--device", default="cpu", help="torch device for both models")
    v.add_argument("--threads", type=int, help="torch threads")
    v.set_defaults(handler=_verify)


def _quantize(args: argparse.Namespace) -> int:
    from worker.quant.scheme import Activations, Method

    if args.activations and args.scheme != "w8a8":
        return _fail("--activations applies to --scheme w8a8 only")
    if args.method != "absmax" and args.activations != "static":
        return _fail("--method chooses calibrated ranges: it needs --scheme w8a8 "
                     "--activations static --calib FILE")
    if args.group_size < 0:
        return _fail("--group-size must be >= 0 (0: one scale per output channel)")
    activations = Activations(args.activations or "dynamic") if args.scheme == "w8a8" else None
    if args.calib and activations is not Activations.STATIC:
        log.warning("--calib is only used for --activations static; ignoring it")
    try:
        quant = QuantConfig(Scheme(args.scheme), Method(args.method), args.group_size,
                            activations, lm_head=args.lm_head, embeddings=args.embeddings)
        calib = _calibration_ids(args.model, args.calib) if quant.static_activations else []
        from worker.quant.quantize import quantize_model

        if args.format == "msmodelslim":
            return _msmodelslim(args, quant, calib)
        summary = quantize_model(args.model, args.out, quant, calib=calib, threads=args.threads)
    except NpuserveError as e:
        return _fail(str(e))
    print(f"{summary.out_dir}: {summary.modules} tensors in int8, "
          f"{summary.source_bytes / 1e6:.1f} MB -> {summary.quantized_bytes / 1e6:.1f} MB "
          f"({summary.quantized_bytes / summary.float32_bytes:.1%} of float32)")
    return 0


def _msmodelslim(args: argparse.Namespace, quant: QuantConfig, calib: list[list[int]]) -> int:
    import tempfile

    from worker.quant import msmodelslim
    from worker.quant.quantize import quantize_model

    if quant.group_size or quant.lm_head or quant.embeddings:
        return _fail("--format msmodelslim writes per-channel int8 decoder projections only; "
                     "drop --group-size, --lm-head and --embeddings")
    ranges = None
    if quant.scheme is Scheme.W8A8:
        if not quant.static_activations:
            return _fail("msmodelslim's w8a8 quantizes activations with calibrated static "
                         "scales: add --activations static --calib FILE")
        with tempfile.TemporaryDirectory() as tmp:
            quantize_model(args.model, Path(tmp) / "int8", quant, calib=calib,
                           threads=args.threads)
            ranges = msmodelslim.static_ranges(Path(tmp) / "int8")
    out = msmodelslim.write(args.model, args.out, quant.scheme.value.upper(), input_ranges=ranges)
    print(f"{out}: msmodelslim {quant.scheme.value.upper()} checkpoint")
    return 0


def _calibration_ids(model: Path, calib: Path | None) -> list[list[int]]:
    from common.errors import InvalidRequestError
    from preprocess.tokenizer import load_tokenizer
    from worker.quant.prompts import load_texts

    if calib is None:
        raise InvalidRequestError("calib", "--activations static needs --calib FILE, "
                                  "prompts like those the model will serve")
    tokenizer = load_tokenizer(model)
    return [list(tokenizer(t.text).input_ids) for t in load_texts(calib)]


def _verify(args: argparse.Namespace) -> int:
    from worker.quant.prompts import load_texts
    from worker.quant.verify import compare, format_table

    if not 0 < args.threshold <= 1:
        return _fail("--threshold must be in (0, 1]")
    try:
        texts = load_texts(args.prompts)
        result = compare(args.model, args.reference, texts, threshold=args.threshold,
                         device=args.device, threads=args.threads)
    except NpuserveError as e:
        return _fail(str(e))
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    if args.answers:
        from worker.quant.answers import format_answers, greedy_answers

        questions = [t.question for t in texts if t.question]
        options = {"device": args.device, "threads": args.threads}
        print(format_answers(questions, greedy_answers(args.reference, questions, **options),
                             greedy_answers(args.model, questions, **options)))
    return 0 if result.passed else 1


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
