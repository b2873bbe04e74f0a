"""`npuserve bench serve`: latency and throughput of the whole stack against load.

Against a running gateway (`--target`) or a throwaway stack of its own (Redis, a gateway and
one worker), it runs each load level in turn, closed loop (`--concurrency 1,4,16`: that many
streams in flight) or open loop (`--rate 2,4,8`: Poisson arrivals, requests per second), with
seeded English and Chinese prompts sent as text and greedy outputs of fixed length. Per level:
requests and output tokens per second, TTFT, ITL, TPOT and E2E percentiles, errors by gRPC
status. With `--compare-engine` the requests each level finished run again through the engine
in this process (same model, backend, settings and max batch): the stack's throughput over
the engine's, and the latency the stack adds per token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.flags import add_flags, from_args
from worker.backends.synthetic_settings import SyntheticSettings
from worker.bench.serve_load import LoadPlan, Tokenizer, run_level
from worker.bench.serve_report import Progress, format_table, machine
from worker.bench.serve_stats import compare, summarize
from worker.bench.serve_workload import LENGTH_DISTRIBUTIONS, Workload, WorkloadSpec, calibrate

DEFAULT_MODEL_DIR = "models/smollm2-135m-instruct"
KV_CACHE_GB = 1.0
"""The torch worker's KV cache unless --worker-args sets --kv-cache-gb."""


@dataclass(frozen=True, slots=True)
class Preset:
    """Defaults of the flags left unset."""

    concurrency: str
    duration_s: float
    input_len: int
    output_len: int


QUICK = Preset("1,4,16", 15.0, 64, 64)
"""--quick: three closed-loop levels of 15 s, short prompts and outputs (under 5 minutes
with its own SmolLM2-135M stack and --compare-engine on 2 cores)."""
FULL = Preset("1,4,16", 30.0, 128, 128)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="load test of the whole stack: TTFT, ITL, E2E and throughput against "
        "load (against --target, or a stack of its own)",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--target", metavar="HOST:PORT",
                   help="a running gateway; unset: start redis-server, a gateway and a worker")
    p.add_argument("--model", default=DEFAULT_MODEL_DIR,
                   help="model directory of the stack's worker and of --compare-engine "
                   f"(default {DEFAULT_MODEL_DIR})")
    p.add_argument("--model-name", default="",
                   help="model to ask the gateway for (default: its only model)")
    levels = p.add_mutually_exclusive_group()
    levels.add_argument("--concurrency", metavar="N[,N...]",
                        help="closed loop: streams kept in flight, one level each "
                        f"(default {FULL.concurrency})")
    levels.add_argument("--rate", metavar="R[,R...]",
                        help="open loop: requests per second (Poisson arrivals), one level each")
    p.add_argument("--input-len", type=int, help="prompt tokens, about (default 128; quick 64)")
    p.add_argument("--output-len", type=int, help="output tokens (default 128; quick 64)")
    p.add_argument("--len-dist", choices=LENGTH_DISTRIBUTIONS, default="uniform",
                   help="length distribution around --input-len and --output-len: uniform "
                   "within +-spread, lognormal with sigma spread, or fixed (default uniform)")
    p.add_argument("--len-spread", type=float, default=0.5, help="(default 0.5)")
    p.add_argument("--zh-fraction", type=float, default=0.3,
                   help="share of Chinese prompts (default 0.3)")
    p.add_argument("--duration", type=float,
                   help="seconds each level sends requests (default 30; quick 15)")
    p.add_argument("--num-prompts", type=int, help="requests per level at most")
    p.add_argument("--hard-cap", type=float,
                   help="seconds after which a level cancels its open streams, counted as "
                   "unfinished (default 2 x duration + 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", type=int, default=1,
                   help="gRPC connections the load generator spreads its streams over "
                   "(default 1)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    p.add_argument("--plot", metavar="OUT.png", help="write the figure here")
    p.add_argument("--quick", action="store_true",
                   help="levels 1,4,16 of 15 s, 64-token prompts and outputs: under 5 minutes")
    p.add_argument("--compare-engine", action="store_true",
                   help="run each level's finished requests through the engine in this "
                   "process too; report stack/engine throughput and the added ITL")
    stack = p.add_argument_group("the worker (of the stack started here, and of "
                                 "--compare-engine)")
    stack.add_argument("--backend", choices=("torch", "synthetic"), default="torch",
                       help="synthetic: no model, a fixed step time (the gateway and Redis "
                       "path alone)")
    stack.add_argument("--max-batch", type=int,
                       help="the worker's --max-num-seqs (default: 16, or the largest "
                       "concurrency if more)")
    stack.add_argument("--worker-args", default="",
                       help="more `npuserve worker` flags, one shell-quoted string (a torch "
                       f"worker gets --kv-cache-gb {KV_CACHE_GB:g} unless they set it)")
    stack.add_argument("--gateway-args", default="",
                       help="more `npuserve gateway` flags, one shell-quoted string")
    add_flags(stack, SyntheticSettings)
    p.set_defaults(handler=_run)


@dataclass(slots=True)
class Plan:
    """The run the flags describe."""

    label: str
    values: list[float]
    workload: WorkloadSpec
    load: LoadPlan
    worker_argv: list[str]
    """`npuserve worker` flags after --model: the backend and its settings, the batch."""


def plan_from_args(args: argparse.Namespace, target: str) -> Plan:
    preset = QUICK if args.quick else FULL
    label = "rate" if args.rate else "concurrency"
    text = args.rate or args.concurrency or preset.concurrency
    values = [float(v) for v in str(text).split(",") if v.strip()]
    if not values or min(values) <= 0:
        raise ValueError(f"--{label} needs positive values, comma-separated")
    duration = float(args.duration or preset.duration_s)
    workload = WorkloadSpec(
        input_len=int(args.input_len or preset.input_len),
        output_len=int(args.output_len or preset.output_len),
        distribution=args.len_dist, spread=args.len_spread, zh_fraction=args.zh_fraction,
        seed=args.seed)
    load = LoadPlan(target=target, model=args.model_name, duration_s=duration,
                    hard_cap_s=args.hard_cap or 2 * duration + 60,
                    max_requests=args.num_prompts, seed=args.seed, channels=args.channels)
    biggest = int(max(values)) if label == "concurrency" else 0
    max_batch = args.max_batch or max(16, biggest)
    argv = ["--backend", args.backend, "--max-num-seqs", str(max_batch)]
    if args.backend == "torch" and "--kv-cache-gb" not in args.worker_args:
        # as `bench engine`: a fixed budget rather than a share of free memory, which the
        # worker and the engine compared with it would each take
        argv += ["--kv-cache-gb", str(KV_CACHE_GB)]
    if args.backend == "synthetic":
        settings = from_args(SyntheticSettings, args)
        for name in SyntheticSettings.__dataclass_fields__:
            argv += ["--" + name.replace("_", "-"), str(getattr(settings, name))]
    argv += shlex.split(args.worker_args)
    return Plan(label, values, workload, load, argv)


def _run(args: argparse.Namespace) -> int:
    try:
        plan = plan_from_args(args, args.target or "")
    except ValueError as exc:
        print(f"npuserve bench serve: {exc}", file=sys.stderr)
        return 2
    if (not args.target or args.compare_engine) and not (Path(args.model) / "config.json"
                                                         ).is_file():
        print(f"npuserve bench serve: no model in {args.model}; build it with `npuserve "
              f"model smollm2 {args.model}` (or `make setup`), or pass --model", file=sys.stderr)
        return 2
    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine(), "target": args.target or "own stack",
                               "model": args.model, "mode": plan.label}
    if not args.target or args.compare_engine:
        results["worker_args"] = plan.worker_argv
    try:
        results |= _against_a_stack(args, plan)
    except (RuntimeError, ConnectionError) as exc:
        print(f"npuserve bench serve: {exc}", file=sys.stderr)
        return 1
    results["wall_s"] = round(time.monotonic() - started, 1)
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        from worker.bench import serve_plot

        serve_plot.plot(results, args.plot)
    return 0


def _against_a_stack(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """The levels against --target, or against a stack started for them."""
    import grpc

    engine_model = args.model if args.compare_engine else None
    try:
        if args.target:
            print(f"npuserve bench serve: load on {args.target}", file=sys.stderr)
            return run_levels(plan, engine_model)
        from worker.bench.serve_stack import StackSpec, local_stack

        biggest = int(max(plan.values)) if plan.label == "concurrency" else 512
        spec = StackSpec(args.model, plan.worker_argv, shlex.split(args.gateway_args),
                         max_streams=max(512, 2 * biggest))
        print(f"npuserve bench serve: starting redis-server, a gateway and a {args.backend} "
              f"worker of {args.model}", file=sys.stderr)
        with local_stack(spec) as target:
            plan.load = LoadPlan(**{**_fields(plan.load), "target": target})
            return run_levels(plan, engine_model)
    except grpc.RpcError as exc:
        raise ConnectionError(f"{plan.load.target or 'the gateway'}: {exc.code().name}: "
                              f"{exc.details()}") from exc


def run_levels(plan: Plan, engine_model: str | None) -> dict[str, Any]:
    """Every level against plan.load.target; with engine_model, each level's finished
    requests then go through the engine in this process, while the stack idles, so the
    two runs of a level are minutes apart at most on a machine whose speed drifts."""
    from worker.bench import serve_engine

    tokenizer = Tokenizer(plan.load.target, plan.load.model)
    try:
        served = tokenizer.served()
        if not served:
            raise RuntimeError(f"{plan.load.target} serves no model with a live worker")
        per_word = calibrate(tokenizer.count, seed=plan.workload.seed)
        workload = Workload(plan.workload, per_word)
        warm = LoadPlan(**{**_fields(plan.load), "max_requests": 2, "duration_s": 60})
        asyncio.run(run_level(warm, workload, -1, "concurrency", 1))
        engine = None
        if engine_model is not None:
            engine = serve_engine.load_engine(worker_config(engine_model, plan.worker_argv))
            serve_engine.warm_up(engine, tokenizer.ids(workload.request(-1, 0).prompt))
        levels, engine_levels, comparison = [], [], []
        for k, value in enumerate(plan.values):
            with Progress(f"stack {plan.label} {value:g}", plan.load.max_requests) as on_done:
                run = asyncio.run(run_level(plan.load, workload, k, plan.label, value, on_done))
            levels.append(summarize(run))
            if engine is None:
                continue
            done = [r for r in run.records if r.ok]
            first = min((r.sent for r in run.records), default=0.0)
            work = serve_engine.Replay(
                [tokenizer.ids(workload.request(k, r.index).prompt) for r in done],
                [r.output_tokens for r in done], [r.sent - first for r in done])
            with Progress(f"engine {plan.label} {value:g}", len(done)) as on_done:
                run = serve_engine.replay(engine, work, plan.label, value,
                                          plan.load.hard_cap_s, on_done)
            engine_levels.append(summarize(run))
            comparison.append({plan.label: value, **compare(levels[-1], engine_levels[-1])})
    finally:
        tokenizer.close()
    results = {"served": served,
               "workload": {**_fields(plan.workload), "tokens_per_word": per_word},
               "duration_s": plan.load.duration_s, "hard_cap_s": plan.load.hard_cap_s,
               "levels": levels}
    if engine is not None:
        results |= {"engine_levels": engine_levels, "comparison": comparison,
                    **_worst(comparison)}
    return results


def _worst(comparison: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the levels: the lowest throughput ratio, the most latency added."""

    def pick(key: str, choose: Any) -> Any:
        return choose((c[key] for c in comparison if c[key] is not None), default=None)

    return {"stack_over_engine_throughput": pick("stack_over_engine_throughput", min),
            "added_itl_p50_ms": pick("added_itl_p50_ms", max),
            "added_itl_p99_ms": pick("added_itl_p99_ms", max)}


def worker_config(model_dir: str, worker_argv: list[str]) -> Any:
    """The WorkerConfig `npuserve worker --model DIR <worker_argv>` runs with."""
    from worker import cli

    root = argparse.ArgumentParser()
    cli.register(root.add_subparsers())
    return cli.config_from_args(root.parse_args(["worker", "--model", model_dir,
                                                 *worker_argv]))


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def main(argv: list[str] | None = None) -> int:
    """`python -m worker.bench.serve_bench [flags]`: the command without the console script,
    whose other subcommands' parsers import torch, so a load generator against --target
    loads neither torch nor the engine."""
    import logging

    root = argparse.ArgumentParser(prog="python -m worker.bench.serve_bench")
    register(root.add_subparsers(dest="bench_command", required=True))
    args = root.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
