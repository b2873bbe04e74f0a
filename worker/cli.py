"""`npuserve worker`: serve one model from the Redis queue until SIGINT or SIGTERM.

Flags come from the settings dataclasses (common.flags): WorkerConfig with its EngineConfig
and RedisConfig, and the settings of every registered backend (the chosen one is used). Each
defaults to an NPUSERVE_* environment variable, then to the field's default. torch and the
engine are imported inside the handler so `npuserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import Any

from common.config import WorkerConfig
from common.flags import add_flags, from_args
from common.gc_tuning import freeze_heap
from worker.backends.registry import BACKENDS, backend_entry

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the `worker` subcommand to the root parser's subparsers."""
    p = subparsers.add_parser(
        "worker",
        help="serve a model: claim requests from Redis, run the engine, stream tokens back",
        description=(
            "Load a model, register with Redis, and serve requests queued for it by gateways "
            "until SIGINT or SIGTERM; then stop claiming, let running requests finish for up "
            "to --drain-timeout seconds, and hand the rest back to the queue."),
    )
    add_flags(p, WorkerConfig)
    for entry in BACKENDS.values():
        add_flags(p.add_argument_group(f"{entry.name} backend settings (--backend "
                                       f"{entry.name})"), entry.settings)
    p.set_defaults(handler=_run)


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """The WorkerConfig the flags describe, with the chosen backend's settings (validated
    on construction)."""
    settings = from_args(backend_entry(args.backend).settings, args)
    return from_args(WorkerConfig, args, backend_settings=settings)


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
    freeze_heap()
    if config.metrics_port:
        service.metrics.serve(config.metrics_port, config.metrics_host, service.probes())
    try:
        service.run(stop)
    finally:
        service.close()
        service.engine.backend.close()
    log.info("worker %s stopped", service.queue.worker_id)
    return 0
