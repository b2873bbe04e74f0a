"""`npuserve worker`: serve one model from the Redis queue until SIGINT or SIGTERM.

Every flag defaults to an NPUSERVE_* environment variable (read through common.config.env),
then to the WorkerConfig default. torch and the engine are imported inside the handler so
`npuserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import Any

from common.config import EngineConfig, RedisConfig, WorkerConfig, env

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the `worker` subcommand to the root parser's subparsers."""
    w, e = WorkerConfig(model_dir=""), EngineConfig()
    p = subparsers.add_parser(
        "worker",
        help="serve a model: claim requests from Redis, run the engine, stream tokens back",
        description=(
            "Load a model, register with Redis, and serve requests queued for it by gateways "
            "until SIGINT or SIGTERM; then stop claiming, let running requests finish for up "
            "to --drain-timeout seconds, and hand the rest back to the queue."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=env("MODEL_DIR", ""), required=not env("MODEL_DIR", ""),
                   help="Hugging Face model directory [NPUSERVE_MODEL_DIR]")
    p.add_argument("--name", default=env("MODEL_NAME", w.model_name),
                   help="model name clients ask for; empty: the directory's name "
                        "[NPUSERVE_MODEL_NAME]")
    p.add_argument("--backend", default=env("BACKEND", w.backend),
                   help="engine backend [NPUSERVE_BACKEND]")
    p.add_argument("--device", default=env("DEVICE", e.device),
                   help="cpu, cuda[:N] or npu[:N] [NPUSERVE_DEVICE]")
    p.add_argument("--dtype", default=env("DTYPE", e.dtype),
                   choices=("float32", "bfloat16", "float16"), help="[NPUSERVE_DTYPE]")
    RedisConfig.add_flags(p)
    p.add_argument("--max-num-seqs", type=int, default=int(env("MAX_NUM_SEQS",
                                                               str(e.max_num_seqs))),
                   help="requests in the running batch; the worker claims no more "
                        "[NPUSERVE_MAX_NUM_SEQS]")
    p.add_argument("--max-batched-tokens", type=int,
                   default=int(env("MAX_BATCHED_TOKENS", str(e.max_num_batched_tokens))),
                   help="token budget of one engine step [NPUSERVE_MAX_BATCHED_TOKENS]")
    p.add_argument("--kv-cache-gb", type=float,
                   default=_opt_float(env("KV_CACHE_GB", "")),
                   help="KV cache GiB; unset: a share of free memory [NPUSERVE_KV_CACHE_GB]")
    p.add_argument("--threads", type=int, default=_opt_int(env("THREADS", "")),
                   help="CPU threads for torch; unset: torch's default [NPUSERVE_THREADS]")
    p.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction,
                   default=env("CPU_KERNELS", "1") not in ("0", "false", "no"),
                   help="on CPU in float32, run decode with npuserve's C kernels, compiled for "
                        "this machine at first start (needs gcc; default on) "
                        "[NPUSERVE_CPU_KERNELS=0 turns them off]")
    p.add_argument("--worker-id", default=env("WORKER_ID", w.worker_id),
                   help="registration id; empty: host-pid-random [NPUSERVE_WORKER_ID]")
    p.add_argument("--lease-ms", type=int, default=int(env("LEASE_MS", str(w.lease_ms))),
                   help="a claimed request is re-queued if not renewed within this "
                        "[NPUSERVE_LEASE_MS]")
    p.add_argument("--heartbeat", type=float,
                   default=float(env("HEARTBEAT_S", str(w.heartbeat_s))),
                   help="registration refresh period in seconds; it expires after three "
                        "missed beats [NPUSERVE_HEARTBEAT_S]")
    p.add_argument("--drain-timeout", type=float,
                   default=float(env("DRAIN_TIMEOUT_S", str(w.drain_timeout_s))),
                   help="seconds to finish running requests on SIGTERM before handing the "
                        "rest back [NPUSERVE_DRAIN_TIMEOUT_S]")
    p.add_argument("--metrics-port", type=int,
                   default=int(env("WORKER_METRICS_PORT", str(w.metrics_port))),
                   help="Prometheus /metrics port; 0 disables [NPUSERVE_WORKER_METRICS_PORT]")
    p.set_defaults(handler=_run)


def _opt_float(raw: str) -> float | None:
    return float(raw) if raw else None


def _opt_int(raw: str) -> int | None:
    return int(raw) if raw else None


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """The WorkerConfig the flags describe (validated on construction)."""
    return WorkerConfig(
        model_dir=args.model,
        model_name=args.name,
        backend=args.backend,
        engine=EngineConfig(device=args.device, dtype=args.dtype,
                            max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_batched_tokens,
                            kv_cache_gb=args.kv_cache_gb, threads=args.threads,
                            cpu_kernels=args.cpu_kernels),
        redis=RedisConfig.from_args(args),
        worker_id=args.worker_id,
        lease_ms=args.lease_ms,
        heartbeat_s=args.heartbeat,
        drain_timeout_s=args.drain_timeout,
        metrics_port=args.metrics_port,
    )


def _run(args: argparse.Namespace) -> int:
    from worker.service import WorkerService

    config = config_from_args(args)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping; draining running requests", signal.Signals(signum).name)
        stop.set()

    # Installed before the model loads, so a SIGTERM during loading still drains cleanly.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    service = WorkerService.from_config(config)
    if config.metrics_port:
        service.metrics.serve(config.metrics_port)
    try:
        service.run(stop)
    finally:
        service.queue.close()
    log.info("worker %s stopped", service.queue.worker_id)
    return 0
