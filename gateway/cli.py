"""`npuserve gateway`: run the gRPC gateway. Every flag defaults to an NPUSERVE_* variable.

| flag                 | environment                   | default                  |
| -------------------- | ----------------------------- | ------------------------ |
| --listen             | NPUSERVE_GATEWAY_LISTEN       | 0.0.0.0:50051            |
| --redis              | NPUSERVE_REDIS_URL            | redis://127.0.0.1:6379/0 |
| --prefix             | NPUSERVE_REDIS_PREFIX         | npuserve:                |
| --gateway-id         | NPUSERVE_GATEWAY_ID           | host-pid-random          |
| --max-queued         | NPUSERVE_MAX_QUEUED           | 1024 (per model)         |
| --max-streams        | NPUSERVE_MAX_STREAMS          | 512                      |
| --default-max-tokens | NPUSERVE_DEFAULT_MAX_TOKENS   | 256                      |
| --max-tokens-limit   | NPUSERVE_MAX_TOKENS_LIMIT     | 8192                     |
| --metrics-port       | NPUSERVE_GATEWAY_METRICS_PORT | 0 (off)                  |
"""

from __future__ import annotations

import argparse
from typing import Any

from common.config import GatewayConfig, RedisConfig, env

_D = GatewayConfig()


def register(subparsers: Any) -> None:
    """Add the `gateway` subcommand to the root parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "gateway", help="run the gRPC gateway",
        description="Serve npuserve.v1.Generation over gRPC: validate and tokenize requests, "
        "queue them in Redis, stream the workers' tokens back.")
    p.add_argument("--listen", default=env("GATEWAY_LISTEN", _D.listen),
                   help="host:port to bind (default: %(default)s)")
    RedisConfig.add_flags(p)
    p.add_argument("--gateway-id", default=env("GATEWAY_ID", _D.gateway_id),
                   help="name of this gateway's reply stream (default: host-pid-random)")
    p.add_argument("--max-queued", type=int, default=int(env("MAX_QUEUED",
                   str(_D.max_queued_per_model))),
                   help="queue bound per model; beyond it RESOURCE_EXHAUSTED "
                   "(default: %(default)s)")
    p.add_argument("--max-streams", type=int, default=int(env("MAX_STREAMS",
                   str(_D.max_streams))),
                   help="concurrent Generate/Chat streams of this gateway (default: %(default)s)")
    p.add_argument("--default-max-tokens", type=int, default=int(env("DEFAULT_MAX_TOKENS",
                   str(_D.default_max_tokens))),
                   help="max_tokens when a request leaves it at 0 (default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=int(env("MAX_TOKENS_LIMIT",
                   str(_D.max_tokens_limit))),
                   help="largest max_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=int(env("GATEWAY_METRICS_PORT",
                   str(_D.metrics_port))),
                   help="Prometheus /metrics port, 0 disables (default: %(default)s)")
    p.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The GatewayConfig the parsed flags describe (validated on construction)."""
    return GatewayConfig(
        redis=RedisConfig.from_args(args),
        listen=args.listen,
        gateway_id=args.gateway_id,
        max_queued_per_model=args.max_queued,
        max_streams=args.max_streams,
        default_max_tokens=args.default_max_tokens,
        max_tokens_limit=args.max_tokens_limit,
        metrics_port=args.metrics_port,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM."""
    import asyncio

    from gateway.server import serve

    asyncio.run(serve(config_from_args(args)))
    return 0
