"""`npuserve gateway`: flags, their NPUSERVE_* defaults, and the config they build."""

from __future__ import annotations

import pytest

from common.cli import build_parser
from common.config import GatewayConfig
from common.errors import InvalidRequestError
from gateway.cli import config_from_args


def test_defaults_match_the_gateway_config() -> None:
    args = build_parser().parse_args(["gateway"])
    assert config_from_args(args) == GatewayConfig()


def test_flags_and_environment_override_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPUSERVE_REDIS_URL", "redis://redis:6379/1")
    monkeypatch.setenv("NPUSERVE_MAX_STREAMS", "7")
    args = build_parser().parse_args([
        "gateway", "--listen", "127.0.0.1:6000", "--prefix", "p:", "--gateway-id", "gw-a",
        "--max-queued", "3", "--default-max-tokens", "8", "--max-tokens-limit", "9",
        "--metrics-port", "9100"])
    config = config_from_args(args)
    assert (config.redis.url, config.redis.prefix, config.listen) == (
        "redis://redis:6379/1", "p:", "127.0.0.1:6000")
    assert (config.gateway_id, config.max_queued_per_model, config.max_streams) == ("gw-a", 3, 7)
    assert (config.default_max_tokens, config.max_tokens_limit, config.metrics_port) == (
        8, 9, 9100)


def test_an_out_of_range_limit_is_refused_naming_it() -> None:
    args = build_parser().parse_args(["gateway", "--max-streams", "0"])
    with pytest.raises(InvalidRequestError, match="max_streams"):
        config_from_args(args)
