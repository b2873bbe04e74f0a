"""`npuserve quantize`: a float checkpoint in, an int8 checkpoint (see scheme.py) out.

Like gpt-fast's weight-only handler, quantizing is a pass over the state dict that replaces
each linear weight with int8 values and scales; the loader later swaps in the matching int8
projection. Everything but the quantized tensors (norms, biases, tokenizer, chat template,
generation config) is copied unchanged, so the output is a complete model directory.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from common.errors import ModelConfigError
from worker.checkpoints.atomic import atomic_directory
from worker.model.config import ModelConfig
from worker.quant.ranges import weight_ranges
from worker.quant.scheme import QMAX, QuantConfig

log = logging.getLogger(__name__)

LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
"""The decoder layers' linear modules; all of them are quantized."""
EMBED = "model.embed_tokens"
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack"}
"""Weight files of the source that are not copied (the int8 safetensors replace them)."""


@dataclass(frozen=True, slots=True)
class QuantizeSummary:
    """What was written; the byte counts cover the quantized tensors only."""

    out_dir: Path
    modules: int
    """Linear modules (and the embedding, when asked) stored in int8."""
    float32_bytes: int
    """Those tensors' size in float32."""
    source_bytes: int
    """Their size in the source checkpoint's dtype."""
    quantized_bytes: int
    """int8 values plus float32 scales (and static input scales)."""


def quantize_tensor(w: torch.Tensor, quant: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (int8 [out, in], float32 scales [out] or [out, in // group])."""
    out, cols = w.shape
    group = quant.group_size or cols
    if cols % group:
        raise ModelConfigError(f"group size {group} does not divide a weight's {cols} input "
                               "columns; choose a divisor (64 and 128 fit most models)")
    rows = w.float().reshape(out * (cols // group), group)
    scale = weight_ranges(rows) / QMAX  # [rows]
    q = (rows / scale[:, None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    scale = scale.reshape(out, cols // group)
    return q.reshape(out, cols), scale[:, 0].contiguous() if group == cols else scale


def quantize_model(src: str | Path, out: str | Path, quant: QuantConfig, *,
                   calib: Sequence[list[int]] = (), threads: int | None = None,
                   progress: bool = True) -> QuantizeSummary:
    """Write the int8 version of checkpoint `src` to `out` (replaced atomically).

    calib: token ids of the calibration prompts; required for static activation scales.
    """
    src, out = Path(src), Path(out)
    config = ModelConfig.from_dir(src)
    if config.quantization is not None:
        raise ModelConfigError(f"{src} is already quantized; quantize its float source")
    if src.resolve() == out.resolve():
        raise ModelConfigError("--out must differ from --model: the source is read while "
                               "the output is written")
    input_scales: dict[str, float] = {}
    if quant.static_activations:
        if not calib:
            raise ModelConfigError("static activation scales need calibration prompts (--calib)")
        from worker.quant.calibrate import calibrate

        input_scales = calibrate(src, calib, quant.method, lm_head=quant.lm_head,
                                 threads=threads, progress=progress)

    tensors: dict[str, torch.Tensor] = {}
    counts = [0, 0, 0, 0]  # modules, float32 bytes, source bytes, quantized bytes
    source = dict(_tensors(src))  # the whole checkpoint in memory: simple, fine up to a few GB
    targets = {name[:-len(".weight")] for name in source
               if name.endswith(".weight") and LINEAR.match(name[:-len(".weight")])}
    if quant.lm_head:
        targets.add("lm_head")
        if "lm_head.weight" not in source:  # tied: the output projection is the embedding
            source["lm_head.weight"] = source[EMBED + ".weight"]
    if quant.embeddings:
        targets.add(EMBED)
    for name, tensor in tqdm(source.items(), desc="quantizing", unit="tensor", file=sys.stderr,
                             disable=not progress):
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        if module not in targets:
            tensors[name] = tensor.contiguous()
            continue
        q, scale = quantize_tensor(tensor, quant)
        tensors[name], tensors[module + ".weight_scale"] = q, scale
        if module in input_scales:
            tensors[module + ".input_scale"] = torch.tensor([input_scales[module]])
        counts[0] += 1
        counts[1] += tensor.numel() * 4
        counts[2] += tensor.nbytes
        counts[3] += q.nbytes + scale.nbytes + (4 if module in input_scales else 0)
    missing = [m for m in targets if m + ".weight_scale" not in tensors]
    if missing:
        raise ModelConfigError(f"{src} has no weights for {sorted(missing)[:3]}")

    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = quant.to_dict()
    with atomic_directory(out) as tmp:
        for f in src.iterdir():
            weights = f.suffix in _WEIGHT_SUFFIXES or f.name.endswith(".index.json")
            if f.is_file() and not weights and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)  # readable like the copied files
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n")
    log.info("wrote %s: %d modules in int8, %.1f MB -> %.1f MB", out, counts[0],
             counts[2] / 1e6, counts[3] / 1e6)
    return QuantizeSummary(out, *counts)


def _tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint's safetensors files, in file and key order."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(f"{model_dir} holds no .safetensors weights")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield key, f.get_tensor(key)
