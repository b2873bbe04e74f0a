"""The two transformers baselines: `generate` one request at a time, and in static batches.

Both decode greedily with `min_new_tokens = max_new_tokens`, so EOS is suppressed and every
request produces exactly its requested length, as in the npuserve phase. The static batcher
takes requests in arrival order, left-pads each batch (with an attention mask) and runs it
until its longest request is done; only each request's own tokens count as useful output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from worker.bench.workload import BenchRequest, PhaseResult, Workload

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

OnTokens = Callable[[int], None]
"""Called with the number of useful output tokens each decoding step produced."""


def load_hf_model(model_dir: str, dtype: str, device: str) -> PreTrainedModel:
    """The checkpoint as a transformers causal LM in eval mode, on `device` in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.to(torch.device(device))  # type: ignore[arg-type]  # transformers types .to oddly
    return model.eval()


def _streamer(lengths: Sequence[int], on_tokens: OnTokens | None) -> Any:
    """A transformers streamer that reports, per step, how many requests still want a token.

    `generate` first puts the prompt, then one token per sequence per step; step k is useful
    for the requests whose requested length exceeds k.
    """
    from transformers.generation.streamers import BaseStreamer

    class _StepStreamer(BaseStreamer):  # type: ignore[misc]
        def __init__(self) -> None:
            self.step = -1  # the first put is the prompt

        def put(self, value: torch.Tensor) -> None:
            if self.step >= 0 and on_tokens is not None:
                on_tokens(sum(1 for n in lengths if n > self.step))
            self.step += 1

        def end(self) -> None:
            pass

    return _StepStreamer()


def _generate(
    model: PreTrainedModel,
    batch: Sequence[BenchRequest],
    pad_id: int,
    on_tokens: OnTokens | None,
) -> list[list[int]]:
    """Greedy-generate one left-padded batch to its longest requested length."""
    import torch

    width = max(len(r.prompt_ids) for r in batch)
    steps = max(r.max_new_tokens for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids) :] = 1
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            do_sample=False,
            max_new_tokens=steps,
            min_new_tokens=steps,
            pad_token_id=pad_id,
            streamer=_streamer([r.max_new_tokens for r in batch], on_tokens),
        )  # [batch, width + steps]
    rows: list[list[int]] = out[:, width:].tolist()
    return [row[: r.max_new_tokens] for row, r in zip(rows, batch, strict=True)]


def pad_token_id(model: PreTrainedModel) -> int:
    """The pad id `generate` should use: the configured one, else EOS, else 0."""
    for cfg in (model.generation_config, model.config):
        for key in ("pad_token_id", "eos_token_id"):
            value = getattr(cfg, key, None)
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int):
                return value
    return 0


def warm_up(model: PreTrainedModel, prompt: Sequence[int]) -> None:
    """One short generate, so lazy initialisation is not charged to the timed phases."""
    _generate(model, [BenchRequest(list(prompt[:16]), 4)], pad_token_id(model), None)


def run_sequential(
    model: PreTrainedModel, workload: Workload, on_tokens: OnTokens | None = None
) -> PhaseResult:
    """Baseline 1: `generate` on each request alone, one after another."""
    pad = pad_token_id(model)
    start = time.perf_counter()
    outputs = [_generate(model, [r], pad, on_tokens)[0] for r in workload.requests]
    wall = time.perf_counter() - start
    total = workload.total_output_tokens
    return PhaseResult("hf_sequential", wall, total, total, outputs)


def run_static_batches(
    model: PreTrainedModel,
    workload: Workload,
    max_batch: int,
    on_tokens: OnTokens | None = None,
) -> PhaseResult:
    """Baseline 2: arrival-order batches of `max_batch`, each run to its longest request."""
    pad = pad_token_id(model)
    reqs = workload.requests
    batches = [reqs[i : i + max_batch] for i in range(0, len(reqs), max_batch)]
    start = time.perf_counter()
    outputs = [row for b in batches for row in _generate(model, b, pad, on_tokens)]
    wall = time.perf_counter() - start
    computed = sum(len(b) * max(r.max_new_tokens for r in b) for b in batches)
    return PhaseResult("hf_batched", wall, workload.total_output_tokens, computed, outputs)
