"""The torch backend on an accelerator, checked then timed: `python -m worker.bench.device_check
--device cuda --out DIR` (what `make bench-cuda` runs on a GPU machine).

1. Parity: random-weight checkpoints shaped like the models served (a tiny Qwen3, SmolLM2-135M,
   Qwen3-0.6B), in float32 and bfloat16 on the device: the runner's logits at every position
   of a 96-token prompt against transformers' on the same device and dtype (cosine, max abs
   difference, top-1 agreement), and 32 greedy tokens from the engine against transformers'
   `generate`.
2. Speed: `npuserve bench engine --quick` (engine vs transformers one at a time and in static
   batches, batch-1 decode vs the copy-bandwidth floor) on the SmolLM2- and Qwen3-0.6B-shaped
   checkpoints in bfloat16.

Results go to DIR/device_check.json, and the benchmark's JSON and plots beside it. Random
weights are enough for both: parity compares two implementations of the same weights, and
speed depends on shapes, not values.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from worker.bench.shapes import SHAPES, build

log = logging.getLogger(__name__)

CHECKED = ("qwen3-tiny", "smollm2-135m", "qwen3-0.6b")
"""The shapes checked by default (`--shapes` adds others of shapes.SHAPES)."""
BENCHED = ("smollm2-135m", "qwen3-0.6b")
PROMPT_LEN, GREEDY_TOKENS = 96, 32


def parity(model_dir: Path, device: str, dtype: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from common.config import EngineConfig
    from common.sampling_params import SamplingParams
    from worker.backends.torch_settings import TorchSettings
    from worker.engine.engine import Engine
    from worker.quant.runner import load_runner

    torch_dtype = getattr(torch, dtype)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device)
    reference.eval()
    vocab = reference.config.vocab_size
    prompt = torch.randint(3, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = reference(prompt[None].to(device)).logits[0].float()
        ref_greedy = reference.generate(
            prompt[None].to(device), max_new_tokens=GREEDY_TOKENS, do_sample=False,
            min_new_tokens=GREEDY_TOKENS, pad_token_id=0)[0, PROMPT_LEN:].tolist()
    runner = load_runner(model_dir, PROMPT_LEN, device=device, dtype=dtype)
    with torch.no_grad():
        ours = runner.logits(runner.prefill_hidden_states(prompt.tolist())).float()
    del runner
    cos = torch.nn.functional.cosine_similarity(ours, ref_logits, dim=-1)
    engine = Engine.from_model_dir(
        model_dir, EngineConfig(max_num_seqs=4),
        settings=TorchSettings(device=device, dtype=dtype, kv_cache_gb=0.5))
    [done] = engine.generate([prompt.tolist()], SamplingParams(
        max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True))
    same = next((i for i, (a, b) in enumerate(zip(done.token_ids, ref_greedy, strict=True))
                 if a != b), GREEDY_TOKENS)
    del engine, reference
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"dtype": dtype, "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "max_abs_diff": float((ours - ref_logits).abs().max()),
            "top1_agreement": float((ours.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
            "greedy_tokens_equal_before_first_difference": same,
            "greedy_tokens": GREEDY_TOKENS}


def bench(model_dir: Path, device: str, out: Path, name: str) -> dict[str, Any]:
    from worker.backends.torch_settings import TorchSettings
    from worker.bench import engine_bench, report

    preset = engine_bench.QUICK
    config = engine_bench.BenchConfig(
        model_dir=str(model_dir), requests=preset["requests"], max_batch=preset["max_batch"],
        backend=TorchSettings(device=device, dtype="bfloat16", kv_cache_gb=4.0),
        decode_tokens=preset["decode_tokens"],
        sequential_requests=preset["sequential_requests"], quick=True)
    results = engine_bench.run(config)
    report.write_json(results, out / f"bench_{name}.json")
    report.plot(results, out / f"bench_{name}.png")
    print(report.format_table(results), flush=True)
    return json.loads((out / f"bench_{name}.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", type=Path, default=Path("/tmp/npuserve-device-check"))
    parser.add_argument("--shapes", nargs="+", default=list(CHECKED), choices=list(SHAPES))
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    found: dict[str, Any] = {"device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        found["gpu"] = torch.cuda.get_device_name(0)
    found["parity"] = {}
    for name in args.shapes:
        model_dir = build(args.models / name, SHAPES[name])
        for dtype in ("float32", "bfloat16"):
            start = time.perf_counter()
            try:
                result = parity(model_dir, args.device, dtype)
            except Exception as exc:  # recorded, so one failing check does not hide the rest
                log.exception("parity %s %s failed", name, dtype)
                result = {"error": repr(exc)}
            found["parity"][f"{name}/{dtype}"] = result
            print(f"parity {name} {dtype}: {result} ({time.perf_counter() - start:.1f}s)",
                  flush=True)
            (args.out / "device_check.json").write_text(json.dumps(found, indent=1))
    if not args.skip_bench:
        found["bench"] = {}
        for name in (n for n in BENCHED if n in args.shapes):
            try:
                found["bench"][name] = bench(args.models / name, args.device, args.out, name)
            except Exception as exc:  # recorded, like a failing parity check
                log.exception("bench %s failed", name)
                found["bench"][name] = {"error": repr(exc)}
            (args.out / "device_check.json").write_text(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
