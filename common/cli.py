"""The `npuserve` console script: one root parser, subcommands registered by their packages.

Each module in COMMAND_MODULES exposes `register(subparsers)` and keeps heavy imports (torch,
transformers, grpc) inside its handlers, so `npuserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from common.errors import NpuserveError

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
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # torch_npu installed without CANN breaks `import torch` when torch loads it by itself;
    # npuserve imports it only for an npu device, where a failure is reported clearly.
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except NpuserveError as exc:  # a user-facing failure: its message says what to fix
        print(f"npuserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
