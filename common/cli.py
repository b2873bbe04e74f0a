"""The `npuserve` console script: one root parser, subcommands registered by their packages.

Each module in COMMAND_MODULES exposes `register(subparsers)` and keeps heavy imports (torch,
transformers, grpc) inside its handlers, so `npuserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from common.config import env
from common.errors import NpuserveError
from common.logs import FORMATS, configure
from common.openmp import configure_openmp

COMMAND_MODULES = (
    "worker.checkpoints.cli",
    "worker.bench.cli",
    "gateway.cli",
    "worker.cli",
    "worker.local_stack",
    "gateway.client_cli",
    "gateway.keys_cli",
    "worker.quant.cli",
    "worker.doctor",
    "worker.chaos",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npuserve",
        description="Serve Qwen-family LLMs on CPUs, GPUs, Ascend NPUs and Sophgo TPUs.",
    )
    parser.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"),
                        help="logging level (default INFO, env NPUSERVE_LOG_LEVEL)")
    parser.add_argument("--log-format", choices=FORMATS, default=env("LOG_FORMAT", "text"),
                        help="text, or json: one JSON object per line with the request id "
                             "and fields (default text, env NPUSERVE_LOG_FORMAT)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # torch_npu installed without CANN breaks `import torch` when torch loads it by itself;
    # npuserve imports it only for an npu device, where a failure is reported clearly.
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    configure_openmp()
    args = build_parser().parse_args(argv)
    configure(args.log_level, args.log_format)
    try:
        return int(args.handler(args) or 0)
    except NpuserveError as exc:  # a user-facing failure: its message says what to fix
        print(f"npuserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
