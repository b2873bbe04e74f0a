"""`npuserve verify`: how closely a model's logits follow a reference's on the same texts.

Both models read every evaluation text teacher-forced; at each position the two logit
vectors are compared (cosine similarity, top-1 agreement, KL(reference || model)) and each
model's log-likelihood of the next token gives its perplexity. Any two model directories
with one vocabulary can be compared: a quantized model and its source, or a converted model
and the checkpoint it came from, a compiled BM1684X bmodel (on Sophgo's simulator) among them.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.errors import ModelConfigError
from worker.quant.prompts import EvalText
from worker.quant.teacher_forced import CheckpointLogits, TeacherForced, open_model

log = logging.getLogger(__name__)

@dataclass(slots=True)
class Agreement:
    """Running sums over positions; `summary()` turns them into the reported metrics."""

    positions: int = 0
    cos_sum: float = 0.0
    cos_min: float = math.inf
    top1_same: int = 0
    kl_sum: float = 0.0
    predicted: int = 0
    """Positions with a next token, the ones perplexity averages over."""
    nll_reference: float = 0.0
    nll_model: float = 0.0

    def add(self, ref: torch.Tensor, ours: torch.Tensor, targets: torch.Tensor) -> None:
        """ref, ours: [n, vocab] float32 logits; targets: [m <= n] next tokens of the first m."""
        cos = F.cosine_similarity(ours, ref, dim=-1).clamp_(-1, 1)  # [n]
        logp_ref, logp_ours = ref.log_softmax(-1), ours.log_softmax(-1)
        kl = (logp_ref.exp() * (logp_ref - logp_ours)).sum(-1)  # [n]
        self.positions += len(cos)
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min()))
        self.top1_same += int((ref.argmax(-1) == ours.argmax(-1)).sum())
        self.kl_sum += float(kl.sum())
        m = len(targets)
        self.predicted += m
        self.nll_reference -= float(logp_ref[:m].gather(1, targets[:, None]).sum())
        self.nll_model -= float(logp_ours[:m].gather(1, targets[:, None]).sum())

    def merge(self, other: Agreement) -> None:
        for name in ("positions", "cos_sum", "top1_same", "kl_sum", "predicted",
                     "nll_reference", "nll_model"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cos_min = min(self.cos_min, other.cos_min)

    def summary(self) -> dict[str, float]:
        n, m = max(self.positions, 1), max(self.predicted, 1)
        return {"positions": self.positions, "cosine_mean": self.cos_sum / n,
                "cosine_min": self.cos_min, "top1_agreement": self.top1_same / n,
                "kl_mean": self.kl_sum / n,
                "perplexity_reference": math.exp(self.nll_reference / m),
                "perplexity_model": math.exp(self.nll_model / m)}


@dataclass(slots=True)
class VerifyResult:
    """The JSON `npuserve verify --json` writes."""

    model: str
    reference: str
    quantization: dict[str, Any] | None
    threshold: float
    overall: dict[str, float]
    texts: list[dict[str, Any]] = field(default_factory=list)
    passed: bool = False
    suggestion: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(model_dir: str | Path, reference_dir: str | Path, texts: Sequence[EvalText], *,
            threshold: float = 0.98, device: str = "cpu", threads: int | None = None,
            progress: bool = True) -> VerifyResult:
    """Run `texts` through both models; passed when the mean cosine reaches `threshold`."""
    from preprocess.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(reference_dir)
    encoded = [list(tokenizer(t.text).input_ids) for t in texts]
    longest = max(len(ids) for ids in encoded)
    ref = CheckpointLogits(reference_dir, longest, device=device, threads=threads)
    ours = open_model(model_dir, longest, device=device, threads=threads)
    try:
        return _compare(ref, ours, str(model_dir), str(reference_dir), texts, encoded,
                        threshold, progress)
    finally:
        ours.close()


def _compare(ref: TeacherForced, ours: TeacherForced, model: str, reference: str,
             texts: Sequence[EvalText], encoded: list[list[int]], threshold: float,
             progress: bool) -> VerifyResult:
    if ref.vocab_size != ours.vocab_size:
        raise ModelConfigError(f"the models' vocabularies differ ({ours.vocab_size} vs "
                               f"{ref.vocab_size} tokens); compare a model with its own source")
    context = min(ref.max_seq_len, ours.max_seq_len)
    if max(len(ids) for ids in encoded) > context:
        log.warning("texts longer than the models' context of %d tokens are cut to it", context)
        encoded = [ids[:context] for ids in encoded]
    total, rows = Agreement(), []
    for text, ids in tqdm(list(zip(texts, encoded, strict=True)), desc="verifying",
                          unit="text", file=sys.stderr, disable=not progress):
        agreement = _agreement(ref, ours, ids)
        total.merge(agreement)
        rows.append({"id": text.id, "lang": text.lang, "kind": text.kind, **agreement.summary()})
    overall = total.summary()
    quant = ours.quantization
    passed = overall["cosine_mean"] >= threshold
    return VerifyResult(
        model=model, reference=reference, quantization=quant, threshold=threshold,
        overall=overall, texts=rows, passed=passed,
        suggestion=None if passed else next_step(quant))


def _agreement(ref: TeacherForced, ours: TeacherForced, ids: list[int]) -> Agreement:
    targets = torch.tensor(ids[1:])
    result = Agreement()
    start = 0
    for ref_rows, our_rows in zip(ref.logit_rows(ids), ours.logit_rows(ids), strict=True):
        end = start + ref_rows.shape[0]
        result.add(ref_rows, our_rows, targets[start:end])
        start = end
    return result


def next_step(quant: dict[str, Any] | None) -> str:
    """What to try when a model falls below the threshold, from the settings it was made with.

    Static activation scales come first: one scale per layer cannot cover the outlier
    channels of LLM activations (SmolLM2: cosine 0.84 static, 0.993 per token), so per-token
    scales are the first advice and the next clipping method the alternative. Then finer
    weight scales, then 16-bit activations, then no int8 at all.
    """
    if quant is None:
        return ("the model is not an npuserve int8 checkpoint: check how it was converted "
                "(weight names and layout, rope and norm settings, tokenizer)")
    if "bmodel" in quant:
        return ("compile it again with finer weights (--quant w8bf16, or bf16) and check that "
                "the converter saw the same checkpoint (the manifest's source_sha256)")
    group = quant.get("group_size", 0)
    requant = "re-run `npuserve quantize` with"
    if quant.get("activations") == "static":
        advice = f"{requant} --activations dynamic (a scale per token, not one per layer)"
        methods = ["absmax", "percentile", "kl"]
        method = quant.get("method", "absmax")
        if method in methods[:-1]:
            later = methods[methods.index(method) + 1]
            advice += f"; to keep static scales, try --method {later}"
        return advice
    if not group:
        return f"{requant} --group-size 128 (a weight scale per 128 inputs, not per row)"
    if quant.get("scheme") == "w8a8":
        return f"{requant} --scheme w8a16 (16-bit activations)"
    if group > 32:
        return f"{requant} --group-size {group // 2}"
    return "int8 is too coarse for this model: serve it in bfloat16 or float32"


def format_table(result: VerifyResult) -> str:
    """Per-text rows and the overall row, then the verdict (and what to try on a failure)."""
    head = (f"{'text':<28} {'tokens':>6} {'cos mean':>8} {'cos min':>8} {'top-1':>7} "
            f"{'KL':>8} {'ppl ref':>8} {'ppl model':>9}")

    def row(name: str, m: dict[str, float]) -> str:
        return (f"{name[:28]:<28} {int(m['positions']):>6} {m['cosine_mean']:>8.4f} "
                f"{m['cosine_min']:>8.4f} {m['top1_agreement']:>7.1%} {m['kl_mean']:>8.4f} "
                f"{m['perplexity_reference']:>8.2f} {m['perplexity_model']:>9.2f}")

    quant = result.quantization
    what = (f"{quant['scheme']}, {quant['method']}, "
            f"{'group ' + str(quant['group_size']) if quant['group_size'] else 'per channel'}"
            + (f", {quant['activations']} activations" if quant.get("activations") else "")
            if quant else "not quantized")
    lines = [f"{result.model} ({what}) against {result.reference}", head]
    lines += [row(t["id"], t) for t in result.texts]
    lines += ["-" * len(head), row("all", result.overall)]
    mean = result.overall["cosine_mean"]
    if result.passed:
        lines.append(f"PASS: mean cosine similarity {mean:.4f} >= {result.threshold}")
    else:
        lines.append(f"FAIL: mean cosine similarity {mean:.4f} < {result.threshold}; "
                     f"next: {result.suggestion}")
    return "\n".join(lines)
