"""`npuserve bench ...` subcommands. Heavy imports stay inside the handlers."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from common.config import LATENCY_PREFILL_STALL
from common.flags import add_flags, from_args
from worker.backends.torch_settings import TorchSettings
from worker.bench import redis_cost, serve_bench
from worker.bench.shapes import SHAPES

log = logging.getLogger(__name__)

DECODE_ONLY_BATCH = 32
"""--decode-only's largest decode batch unless --max-batch says otherwise."""

BENCH_SETTINGS = TorchSettings(kv_cache_gb=1.0)
"""The torch backend's defaults, with a fixed KV cache budget rather than a share of memory."""


def register(subparsers: Any) -> None:
    """Add `bench` and its sub-subcommands to the root parser's subparsers."""
    bench = subparsers.add_parser("bench", help="benchmarks that print results and write JSON")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    engine = sub.add_parser(
        "engine",
        help="offline throughput: npuserve vs transformers, and batch-1 decode vs bandwidth",
        description=(
            "Run one seeded workload (prompts of 32-512 random tokens, 16-256 greedy output "
            "tokens with EOS ignored) through npuserve's engine, transformers generate one "
            "request at a time, and transformers generate in static batches; measure copy "
            "bandwidth and npuserve's batch-1 decode time against the bandwidth floor."
        ),
    )
    checkpoint = engine.add_argument_group(
        "the model (one of --model and --shape)")
    checkpoint.add_argument("--model", help="HF-format checkpoint directory")
    checkpoint.add_argument(
        "--shape", choices=list(SHAPES),
        help="a random float32 checkpoint of this shape instead, built once (seeded, no "
        "network) under --shape-dir; on disk qwen3-0.6b takes 2.4 GB, qwen3-1.7b 6.9 GB "
        "(and their --quantized auto copies 1.1 and 2.7 GB); no tokenizer, token ids only")
    checkpoint.add_argument(
        "--shape-dir", metavar="DIR",
        help="where --shape checkpoints are built and reused (default ~/.cache/npuserve/shapes)")
    engine.add_argument(
        "--decode-only", action="store_true",
        help="skip the workload and the transformers baselines: only the copy-bandwidth floor, "
        "batch-1 decode (and --quantized's) and decode tokens/s by batch size, 1, 2, 4 ... up "
        "to --max-batch (default 32; fewer batches for models of a billion parameters and "
        "more make the run shorter)")
    engine.add_argument(
        "--quick",
        action="store_true",
        help="32 requests, max batch 16, one-at-a-time baseline on every 8th "
        "(under 4 min for a 135M model)",
    )
    engine.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    engine.add_argument("--plot", metavar="OUT.png",
                        help="write a PNG here: a bar chart, or with --mixed-load the streams' "
                        "inter-token gaps over time, without and with the cap")
    engine.add_argument("--max-batch", type=int,
                        help="concurrent requests (default 16; quick 16); --decode-only: the "
                        "largest decode batch (default 32)")
    engine.add_argument("--requests", type=int, help="workload size (default 64; quick 32)")
    engine.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    engine.add_argument(
        "--shared-prefix", action="store_true",
        help="run the shared-prefix workload instead: requests of --prefix-tokens shared and "
        "--own-tokens own prompt tokens, --output-tokens out, with prefix caching on and off "
        "(time to first token of a hit and a miss, batched throughput, equal outputs); "
        "--requests defaults to 8",
    )
    engine.add_argument(
        "--contention", action="store_true",
        help="run the contention workload instead: npuserve idle, beside a busy process, and "
        "two engines side by side, and transformers' static batches beside the busy process "
        "(throughput ratios); --requests defaults to 16",
    )
    engine.add_argument("--prefix-tokens", type=int, default=512,
                        help="shared-prefix workload: the shared prompt's tokens (default 512)")
    engine.add_argument("--own-tokens", type=int, default=64,
                        help="shared-prefix workload: each request's own tokens (default 64)")
    engine.add_argument("--output-tokens", type=int, default=64,
                        help="shared-prefix workload: output tokens per request (default 64)")
    engine.add_argument(
        "--quantized", metavar="DIR|auto",
        help="a quantized copy of --model (npuserve quantize): also time its batch-1 decode, "
        "alternating with the float model's, and report the speed-up and its own floor; "
        "auto: the model's w8a16 copy in the sibling directory NAME-w8a16, quantized there "
        "once and then reused",
    )
    mixed = engine.add_argument_group(
        "mixed load (--mixed-load): running streams' inter-token latency while prompts arrive")
    mixed.add_argument(
        "--mixed-load", action="store_true",
        help="run the mixed-load workload instead: --streams requests decode while prompts of "
        "--arrival-tokens arrive every ~--arrival-interval seconds, once with the prefill cap "
        "off and once with --max-prefill-stall (inter-token latency p50/p90/p99 of the "
        "streams, throughput, the arrivals' time to first token)",
    )
    mixed.add_argument("--streams", type=int, default=8,
                       help="requests decoding throughout (default 8)")
    mixed.add_argument("--stream-tokens", type=int, default=256,
                       help="fewest output tokens of each stream, after 128 prompt tokens; it "
                       "decodes on until every arrival has its first token (default 256)")
    mixed.add_argument("--arrivals", type=int, default=6,
                       help="prompts arriving while the streams decode (default 6)")
    mixed.add_argument("--arrival-tokens", type=int, default=512,
                       help="prompt tokens of each arrival, which asks 16 out (default 512)")
    mixed.add_argument("--arrival-interval", type=float, default=3.0,
                       help="mean seconds between arrivals, each gap 0.5-1.5x (default 3)")
    mixed.add_argument("--max-prefill-stall", type=float, default=LATENCY_PREFILL_STALL,
                       help="the capped run's setting, as the worker's flag "
                       f"(default {LATENCY_PREFILL_STALL:g})")
    add_flags(engine.add_argument_group("torch backend settings (device, dtype and threads "
                                        "apply to the transformers phases too)"),
              TorchSettings, BENCH_SETTINGS)
    engine.set_defaults(handler=_engine)
    redis_cost.register(sub)
    serve_bench.register(sub)


def _engine(args: argparse.Namespace) -> int:
    from worker.bench import engine_bench, quant_phase, report

    modes = [flag for flag, on in (("--shared-prefix", args.shared_prefix),
                                   ("--contention", args.contention),
                                   ("--mixed-load", args.mixed_load)) if on]
    if len(modes) > 1:
        print(f"{' and '.join(modes)} are separate workloads: choose one", file=sys.stderr)
        return 2
    problem = _model_problem(args, modes)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.shape:
        from worker.bench import shapes

        root = Path(args.shape_dir) if args.shape_dir else None
        args.model = str(shapes.checkpoint(args.shape, root))
    if args.mixed_load:
        return _mixed_load(args)
    if args.shared_prefix:
        return _shared_prefix(args)
    if args.contention:
        return _contention(args)
    preset = engine_bench.QUICK if args.quick else engine_bench.FULL
    requests = preset["requests"] if args.requests is None else args.requests
    max_batch = preset["max_batch"] if args.max_batch is None else args.max_batch
    if args.decode_only:
        requests = max_batch = DECODE_ONLY_BATCH if args.max_batch is None else args.max_batch
    if requests < 1 or max_batch < 1:
        print("--requests and --max-batch must be >= 1", file=sys.stderr)
        return 2
    if args.quantized == "auto":
        args.quantized = str(quant_phase.w8a16_copy(args.model))
    config = engine_bench.BenchConfig(
        model_dir=args.model,
        requests=requests,
        max_batch=max_batch,
        seed=args.seed,
        backend=from_args(TorchSettings, args),
        decode_tokens=preset["decode_tokens"],
        sequential_requests=preset["sequential_requests"],
        quick=args.quick,
        quantized_dir=args.quantized,
        decode_only=args.decode_only,
    )
    results = engine_bench.run(config)
    if args.json:
        report.write_json(results, args.json)
        log.info("wrote %s", args.json)
    if args.plot:
        report.plot(results, args.plot)
        log.info("wrote %s", args.plot)
    print(report.format_table(results))
    return 0


def _model_problem(args: argparse.Namespace, modes: list[str]) -> str | None:
    """What is wrong with the model and mode flags together, if anything."""
    if (args.model is None) == (args.shape is None):
        return ("give the model as exactly one of --model DIR (a checkpoint) and --shape NAME "
                f"(a random one: {', '.join(SHAPES)})")
    if args.shape_dir and not args.shape:
        return "--shape-dir goes with --shape"
    if args.decode_only and modes:
        return f"--decode-only goes with the default workload, not {modes[0]}"
    if args.decode_only and args.requests is not None:
        return ("--decode-only runs no workload: drop --requests (--max-batch sets the largest "
                "decode batch)")
    return None


def _contention(args: argparse.Namespace) -> int:
    from worker.bench import contention_bench, report

    if args.plot or args.quantized:
        print("--plot and --quantized go with the mixed workload, not --contention",
              file=sys.stderr)
        return 2
    config = contention_bench.ContentionConfig(
        model_dir=args.model,
        requests=16 if args.requests is None else args.requests,
        max_batch=16 if args.max_batch is None else args.max_batch,
        seed=args.seed,
        backend=from_args(TorchSettings, args),
    )
    if min(config.requests, config.max_batch) < 1:
        print("--requests and --max-batch must be >= 1", file=sys.stderr)
        return 2
    results = contention_bench.run(config, progress=lambda line: log.info("%s", line))
    if args.json:
        report.write_json(results, args.json)
        log.info("wrote %s", args.json)
    print(contention_bench.format_table(results))
    return 0


def _shared_prefix(args: argparse.Namespace) -> int:
    from worker.bench import prefix_bench, report

    if args.plot or args.quantized:
        print("--plot and --quantized go with the mixed workload, not --shared-prefix",
              file=sys.stderr)
        return 2
    config = prefix_bench.PrefixBenchConfig(
        model_dir=args.model,
        requests=8 if args.requests is None else args.requests,
        max_batch=16 if args.max_batch is None else args.max_batch,
        prefix_tokens=args.prefix_tokens,
        own_tokens=args.own_tokens,
        output_tokens=args.output_tokens,
        seed=args.seed,
        backend=from_args(TorchSettings, args),
    )
    if (min(config.requests, config.max_batch, config.own_tokens, config.output_tokens) < 1
            or config.prefix_tokens < 0):
        print("--requests, --max-batch, --own-tokens and --output-tokens must be >= 1, "
              "--prefix-tokens >= 0", file=sys.stderr)
        return 2
    results = prefix_bench.run(config)
    if args.json:
        report.write_json(results, args.json)
        log.info("wrote %s", args.json)
    print(prefix_bench.format_table(results))
    return 0


def _mixed_load(args: argparse.Namespace) -> int:
    from worker.bench import mixed_bench, mixed_plot, report

    others = [flag for flag, on in (("--shared-prefix", args.shared_prefix),
                                    ("--quantized", args.quantized))
              if on]
    if others:
        print(f"{', '.join(others)} go with other workloads, not --mixed-load",
              file=sys.stderr)
        return 2
    try:
        config = mixed_bench.MixedLoadConfig(
            model_dir=args.model,
            streams=args.streams,
            stream_output_tokens=args.stream_tokens,
            arrivals=args.arrivals,
            arrival_prompt_tokens=args.arrival_tokens,
            arrival_interval_s=args.arrival_interval,
            max_prefill_stall=args.max_prefill_stall,
            seed=args.seed,
            backend=from_args(TorchSettings, args),
        )
    except ValueError as exc:
        print(f"--mixed-load: {exc}", file=sys.stderr)
        return 2
    results = mixed_bench.run(config)
    if args.json:
        report.write_json(results, args.json)
        log.info("wrote %s", args.json)
    if args.plot:
        mixed_plot.plot(results, args.plot)
        log.info("wrote %s", args.plot)
    print(mixed_bench.format_table(results))
    return 0
