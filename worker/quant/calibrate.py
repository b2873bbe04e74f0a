"""Static activation scales for w8a8: calibration prompts run through the float model.

Each projection of the loaded model is swapped for an observer that records its input and
then calls it, so calibration runs the very forward pass that serving runs. absmax needs one
pass (the largest magnitude); percentile and kl need a second pass that fills a histogram
of magnitudes over [0, that maximum].
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from worker.quant.ranges import ACTIVATION_BINS, histogram_range
from worker.quant.runner import load_runner
from worker.quant.scheme import QMAX, Method

FUSED_MODULES = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
"""Runtime projection of a decoder layer -> the Hugging Face modules fused into it."""


class InputObserver:
    """Stands in for a projection: records the magnitudes of its input, then calls it."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.amax = 0.0
        self.hist: torch.Tensor | None = None  # [ACTIVATION_BINS] once the second pass starts

    def start_histogram(self) -> None:
        self.hist = torch.zeros(ACTIVATION_BINS, dtype=torch.float64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mags = x.detach().abs().float()
        if self.hist is None:
            self.amax = max(self.amax, float(mags.max()))
        elif self.amax > 0:
            index = (mags.flatten() * (ACTIVATION_BINS / self.amax)).long().clamp_(
                0, ACTIVATION_BINS - 1)
            self.hist += torch.bincount(index.cpu(), minlength=ACTIVATION_BINS).double()
        return self.inner(x)  # type: ignore[operator]

    def scale(self, method: Method) -> float:
        """The int8 step: the chosen clipping magnitude over 127."""
        hist = self.hist if self.hist is not None else torch.zeros(ACTIVATION_BINS)
        return histogram_range(hist.float(), self.amax, method) / QMAX


def calibrate(model_dir: str | Path, prompts: Sequence[list[int]], method: Method, *,
              lm_head: bool = False, threads: int | None = None,
              progress: bool = True) -> dict[str, float]:
    """Run token-id `prompts` through the float model -> {HF module name: input scale}."""
    runner = load_runner(model_dir, max(len(p) for p in prompts), threads=threads)
    weights = runner.weights
    observers: dict[str, InputObserver] = {}
    for i, layer in enumerate(weights.layers):
        for attr, modules in FUSED_MODULES.items():
            obs = InputObserver(getattr(layer, attr))
            setattr(layer, attr, obs)
            observers.update({f"model.layers.{i}.{m}": obs for m in modules})
    if lm_head:
        weights.lm_head = observers["lm_head"] = InputObserver(weights.lm_head)  # type: ignore[assignment]
    passes = 1 if method is Method.ABSMAX else 2
    unique = list({id(o): o for o in observers.values()}.values())
    with tqdm(total=passes * len(prompts), desc="calibrating", unit="prompt", file=sys.stderr,
              disable=not progress) as bar:
        for n in range(passes):
            if n == 1:
                for obs in unique:
                    obs.start_histogram()
            for ids in prompts:
                hidden = runner.prefill_hidden_states(ids)
                if lm_head:
                    runner.logits(hidden)
                bar.update(1)
    return {name: obs.scale(method) for name, obs in observers.items()}
