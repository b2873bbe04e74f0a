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
    """Each question as one user message through the chat template, answered greedily. A
    compiled bmodel directory answers on the BM1684X simulator, within its SEQLEN."""
    from preprocess.tokenizer import load_tokenizer, render_chat
    from worker.checkpoints.bmodel import MANIFEST
    from worker.engine.engine import Engine

    tokenizer = load_tokenizer(model_dir)
    if (Path(model_dir) / MANIFEST).is_file():
        from worker.backends.sophon.settings import SophonSettings

        engine = Engine.from_model_dir(model_dir, backend="sophon",
                                       settings=SophonSettings(pool_size=4))
    else:
        settings = TorchSettings(device=device, threads=threads, kv_cache_gb=0.25)
        engine = Engine.from_model_dir(model_dir, backend="torch", settings=settings)
    prompts = []
    for q in questions:
        text = render_chat(tokenizer, [{"role": "user", "content": q}])
        prompts.append(list(tokenizer(text, add_special_tokens=False).input_ids))
    room = {i: min(max_tokens, engine.max_len - 1 - len(p)) for i, p in enumerate(prompts)}
    fits = [i for i, n in room.items() if n > 0]
    try:
        done = engine.generate([prompts[i] for i in fits],
                               [SamplingParams(max_tokens=room[i], temperature=0.0)
                                for i in fits])
    finally:
        engine.backend.close()
    answers = [f"(the prompt's {len(p)} tokens leave no room in a context of {engine.max_len})"
               for p in prompts]
    for i, completion in zip(fits, done, strict=True):
        answers[i] = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()
    return answers


def format_answers(questions: Sequence[str], reference: Sequence[str],
                   model: Sequence[str]) -> str:
    """Question, reference answer and model answer, one block per question."""
    blocks = []
    for q, r, m in zip(questions, reference, model, strict=True):
        same = "same" if r == m else "differs"
        blocks.append(f"Q: {q}\n  reference: {r!r}\n  model ({same}): {m!r}")
    return "\n".join(blocks)
