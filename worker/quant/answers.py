"""Greedy answers to the evaluation set's demo questions, to read next to the metrics.

Similar logits do not guarantee readable text at every step, so `npuserve verify --answers`
shows what each model actually says when chatting.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.sampling_params import SamplingParams
from worker.backends.torch_settings import TorchSettings


def greedy_answers(model_dir: str | Path, questions: Sequence[str], max_tokens: int = 48, *,
                   device: str = "cpu", threads: int | None = None) -> list[str]:
    """Each question as one user message through the chat template, answered greedily."""
    from preprocess.tokenizer import load_tokenizer, render_chat
    from worker.engine.engine import Engine

    tokenizer = load_tokenizer(model_dir)
    settings = TorchSettings(device=device, threads=threads, kv_cache_gb=0.25)
    engine = Engine.from_model_dir(model_dir, backend="torch", settings=settings)
    prompts = []
    for q in questions:
        text = render_chat(tokenizer, [{"role": "user", "content": q}])
        prompts.append(list(tokenizer(text, add_special_tokens=False).input_ids))
    done = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return [tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() for c in done]


def format_answers(questions: Sequence[str], reference: Sequence[str],
                   model: Sequence[str]) -> str:
    """Question, reference answer and model answer, one block per question."""
    blocks = []
    for q, r, m in zip(questions, reference, model, strict=True):
        same = "same" if r == m else "differs"
        blocks.append(f"Q: {q}\n  reference: {r!r}\n  model ({same}): {m!r}")
    return "\n".join(blocks)
