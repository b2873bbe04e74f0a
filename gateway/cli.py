"""`npuserve gateway`: run the gRPC gateway. Every flag defaults to an NPUSERVE_* variable.

The flags are GatewayConfig's fields and RedisConfig's (common.flags); `npuserve gateway
--help` lists each with its default and variable: --listen (NPUSERVE_GATEWAY_LISTEN),
--redis (NPUSERVE_REDIS_URL), --prefix, --gateway-id, --max-queued (NPUSERVE_MAX_QUEUED),
--max-streams, --default-max-tokens, --max-tokens-limit, --request-ttl and --metrics-port
(NPUSERVE_GATEWAY_METRICS_PORT).
"""

from __future__ import annotations

import argparse
from typing import Any

from common.config import GatewayConfig
from common.flags import add_flags, from_args


def register(subparsers: Any) -> None:
    """Add the `gateway` subcommand to the root parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "gateway", help="run the gRPC gateway",
        description="Serve npuserve.v1.Generation over gRPC: validate and tokenize requests, "
        "queue them in Redis, stream the workers' tokens back.")
    add_flags(p, GatewayConfig)
    p.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The GatewayConfig the parsed flags describe (validated on construction)."""
    return from_args(GatewayConfig, args)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM."""
    import asyncio

    from gateway.server import serve

    asyncio.run(serve(config_from_args(args)))
    return 0
