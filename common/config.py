"""Typed settings, validated on construction. The only module that reads the environment."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import InvalidRequestError

FLAG = "flag"
"""Field metadata key: the field's command-line flag, when it is not --field-name."""
ENV = "env"
"""Field metadata key: NAME of the field's NPUSERVE_NAME variable, when it is not FIELD_NAME."""
CHOICES = "choices"
"""Field metadata key: the values a flag accepts."""
NO_FLAG = "no_flag"
"""Field metadata key: the field has no flag (it is set by code, not by an operator)."""


def setting(default: Any, *, flag: str | None = None, env: str | None = None,
            choices: tuple[str, ...] | None = None) -> Any:
    """A settings field whose flag, environment variable or accepted values are not the ones
    `common.flags` derives from its name (kept so deployed flags and variables keep working)."""
    meta: dict[str, Any] = {}
    if flag is not None:
        meta[FLAG] = flag
    if env is not None:
        meta[ENV] = env
    if choices is not None:
        meta[CHOICES] = choices
    return field(default=default, metadata=meta)


LATENCY_PREFILL_STALL = 0.5
"""The default max_prefill_stall of a CPU with AVX-512 (`default_prefill_stall`): it kept p99
inter-token latency within 2x the p50 while 512-token prompts arrived (SmolLM2 on 2 cores;
bench engine --mixed-load)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The scheduler's limits, whatever the backend. Device placement, dtype and KV cache
    sizing are the backend's own settings (`worker.backends.registry`)."""

    max_num_seqs: int = 16
    """Most requests in the running batch; the worker claims no more."""
    max_num_batched_tokens: int = setting(512, flag="--max-batched-tokens",
                                          env="MAX_BATCHED_TOKENS")
    """Token budget of one step (decodes + prefill chunks): bounds how long a step can stall
    running streams when a long prompt arrives."""
    max_prefill_stall: float | None = None
    """While requests are decoding, the prefill chunks of a step are cut so that they add at
    most about this many decode steps' time to it (the engine estimates both from its own
    step times), so a prompt arriving stretches the running streams' inter-token gap to
    at most about (1 + this) times its usual; at least one token is prefilled per step
    (one KV block until a step time is measured). The cap is for prompts arriving after
    the running streams began: requests that arrived before them prefill outside it, as
    do all while more requests await prefill than decode (a burst), and it rises as far
    as every capped prompt needs to have its first token within a step for every 8 of
    its tokens after arriving, 64 steps at most, and is never below twice the prompt
    tokens arriving per second times a decode step.
    Without running decodes prefill takes the whole --max-batched-tokens budget. 0 turns
    the cap off: prefill beside decodes is bounded by the budget alone, for the shortest
    time to first token. Unset: the backend's (`BackendCapacity.prefill_stall`: 0.5 on
    a CPU with AVX-512; off on AVX2, where it cost x0.65-0.78 of the throughput with 16
    requests in flight, and on accelerators, where it has not been measured). SmolLM2 on 2 Zen 5
    cores, 8 streams, a 512-token prompt every ~3 s: 0.5 kept the streams' p99 gap within
    1.64-1.87x their p50 (no cap: 16x) at x0.90-0.99 throughput, and arrivals had their
    first token in 1.8-2.4 s on average (no cap: 0.5 s); with 16 requests in flight,
    replaced as they finish, the first token's p50 was 0.32 s (no cap: 0.16 s) at x0.99
    throughput, and the p99 inter-token gap 116 ms (no cap: 285). Backends that cannot
    chunk prefill or mix it with decodes never have a cap."""
    max_model_len: int | None = None
    """Cap on prompt + completion tokens; unset means the model's context length."""
    enable_prefix_caching: bool = True
    """Keep the KV blocks of computed prompts and outputs, and start requests whose tokens
    begin with the same full blocks after them (automatic prefix caching); on where the
    backend can (torch), always off where it cannot (sophon)."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(name, "must be >= 1")
        if self.max_prefill_stall is not None and not self.max_prefill_stall >= 0:  # NaN too
            raise InvalidRequestError("max_prefill_stall", "must be >= 0 (0: no cap)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidRequestError("max_model_len", "must be >= 2")


def env(name: str, default: str) -> str:
    """NPUSERVE_<name> from the environment, else default: CLI flags take their defaults here."""
    return os.environ.get(f"NPUSERVE_{name}", default)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = setting("redis://127.0.0.1:6379/0", flag="--redis", env="REDIS_URL")
    """Redis URL: redis://[user@]host:port/db, rediss://... for TLS (?ssl_ca_certs=FILE),
    unix:///path.sock, or redis+sentinel://[user@]host:port,host:port/SERVICE[/db] for the
    master a set of sentinels names (common.redis_client)."""
    prefix: str = setting("npuserve:", env="REDIS_PREFIX")
    """Prefix of every key, so several deployments can share one Redis."""
    password_file: str = setting("", flag="--redis-password-file",
                                 env="REDIS_PASSWORD_FILE")
    """File holding the Redis password (e.g. a mounted secret); else NPUSERVE_REDIS_PASSWORD
    is used if set. Never put the password in --redis, where `ps` shows it."""

    def password(self) -> str | None:
        """The Redis password: --redis-password-file's first line, or NPUSERVE_REDIS_PASSWORD,
        or None (then the URL's, if any)."""
        if self.password_file:
            try:
                lines = Path(self.password_file).read_text().splitlines()
            except OSError as exc:
                raise InvalidRequestError("redis_password_file", f"cannot read "
                                          f"{self.password_file}: {exc.strerror}") from None
            return lines[0] if lines else ""
        return os.environ.get("NPUSERVE_REDIS_PASSWORD") or None

    @staticmethod
    def sentinel_password() -> str | None:
        """The sentinels' own password (their requirepass), NPUSERVE_REDIS_SENTINEL_PASSWORD;
        None asks them without one. Only used with a redis+sentinel:// URL."""
        return env("REDIS_SENTINEL_PASSWORD", "") or None

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> None:
        """--redis and --prefix, shared by every process that talks to the queue."""
        from common.flags import add_flags

        add_flags(parser, RedisConfig)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RedisConfig:
        from common.flags import from_args

        return from_args(cls, args)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    redis: RedisConfig = RedisConfig()
    listen: str = setting("0.0.0.0:50051", env="GATEWAY_LISTEN")
    """host:port the gRPC server binds."""
    http_listen: str = setting("", env="GATEWAY_HTTP_LISTEN")
    """host:port of the OpenAI-compatible HTTP API and the chat page (e.g. 0.0.0.0:8000),
    served beside gRPC by the same process; empty: no HTTP API."""
    gateway_id: str = ""
    """Name of this gateway's reply stream; empty picks a unique one at start."""
    max_queued_per_model: int = setting(1024, flag="--max-queued", env="MAX_QUEUED")
    """Queue bound per model; beyond it Generate fails with RESOURCE_EXHAUSTED."""
    max_streams: int = 512
    """Concurrent Generate/Chat streams this gateway serves; beyond it RESOURCE_EXHAUSTED."""
    default_max_tokens: int = 256
    """max_tokens when a request leaves it at 0."""
    max_tokens_limit: int = 8192
    """Largest max_tokens a request may ask for."""
    max_stop_strings: int = 16
    """Most stop strings one request may give."""
    max_stop_chars: int = 256
    """Longest stop string, in characters."""
    max_stop_token_ids: int = 256
    """Most stop token ids one request may give."""
    max_prompt_bytes: int = 2 << 20
    """Largest prompt, in UTF-8 bytes of text (a chat: all its contents together)."""
    max_chat_messages: int = 1024
    """Most messages in one chat request."""
    max_message_bytes: int = 4 << 20
    """Largest gRPC message the gateway receives or sends."""
    tls_cert: str = ""
    """PEM certificate chain of the gateway's gRPC port; with --tls-key, serve TLS only."""
    tls_key: str = ""
    """PEM private key of --tls-cert."""
    tls_client_ca: str = ""
    """PEM CA bundle: clients must present a certificate it signed (mutual TLS)."""
    api_keys: str = ""
    """TOML file of API keys (hashed; `npuserve keys add`), re-read when it changes or on
    SIGHUP: every call must then present one ('authorization: Bearer <key>'), and carries
    its key's tenant, role and limits. Empty: no authentication (use mutual TLS or a
    trusted network)."""
    reflection: bool = True
    """Serve gRPC server reflection (grpcurl and similar tools list the API with it)."""
    allow_special_tokens: bool = False
    """Let prompt text and chat contents spell the model's control tokens (<|im_start|>,
    ...) and have them tokenized as such; off, they are tokenized as the text they are, so
    a user cannot fake a system turn. For gateways whose every caller is trusted."""
    request_ttl_s: int = setting(3600, flag="--request-ttl")
    """Lifetime in seconds of a request's keys in Redis when nothing else removes them."""
    shutdown_grace_s: float = setting(25.0, flag="--shutdown-grace",
                                      env="GATEWAY_SHUTDOWN_GRACE_S")
    """On SIGTERM: health turns NOT_SERVING at once and running streams get this many
    seconds to finish before they are cancelled. Keep it below the supervisor's kill
    timeout (Kubernetes' terminationGracePeriodSeconds, compose's stop_grace_period)."""
    metrics_port: int = setting(0, env="GATEWAY_METRICS_PORT")
    """Port of Prometheus /metrics and the probe /readyz; 0 disables."""
    metrics_host: str = setting("127.0.0.1", env="GATEWAY_METRICS_HOST")
    """Address /metrics binds: loopback unless a scraper elsewhere needs it (0.0.0.0)."""

    def __post_init__(self) -> None:
        for name in ("max_queued_per_model", "max_streams", "default_max_tokens",
                     "max_tokens_limit", "request_ttl_s", "max_stop_strings", "max_stop_chars",
                     "max_stop_token_ids", "max_prompt_bytes", "max_chat_messages",
                     "max_message_bytes"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(name, "must be >= 1")
        if self.shutdown_grace_s < 0:
            raise InvalidRequestError("shutdown_grace_s", "must be >= 0")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model_dir: str = field(metadata={FLAG: "--model"})
    """Hugging Face model directory to serve."""
    model_name: str = setting("", flag="--name")
    """Name clients use in `model`; empty uses the directory's name."""
    backend: str = "torch"
    """Engine backend, by its name in worker.backends.registry."""
    engine: EngineConfig = EngineConfig()
    backend_settings: Any = field(default=None, metadata={NO_FLAG: True})
    """The backend's own settings, an instance of the class its registry entry names; None
    uses that class's defaults."""
    redis: RedisConfig = RedisConfig()
    worker_id: str = ""
    """Registration id; empty picks host-pid-random."""
    lease_ms: int = 15000
    """A claimed request goes back to the queue if its worker does not renew within this."""
    heartbeat_s: float = setting(2.0, flag="--heartbeat")
    """Registration refresh period in seconds; the registration expires after three missed
    beats."""
    drain_timeout_s: float = setting(30.0, flag="--drain-timeout")
    """On SIGTERM: seconds to finish running requests before handing the rest back; a step
    that would not end in time (judged by the last one) is not started."""
    stream_retention_s: float = 60.0
    """How long a finished request's tokens and final event stay in Redis, so that a client
    whose gateway died can resume the stream at another gateway (Resume); 0 removes them
    at once."""
    step_warn_s: float = 30.0
    """An engine step running longer than this is logged and counted
    (npuserve_worker_slow_steps); leases stay renewed meanwhile."""
    step_timeout_s: float = 0.0
    """An engine step running longer than this means a wedged device or kernel: the worker
    hands its requests back and exits (status 3) for its supervisor to restart it. 0: never."""
    liveness_timeout_s: float = setting(120.0, flag="--liveness-timeout")
    """/livez (on the metrics port) fails once the engine loop or the heartbeat thread has
    not gone round for this long: a wedged worker, for its supervisor to restart. A step
    counts from its start, so keep it above the longest prefill step."""
    metrics_port: int = setting(0, env="WORKER_METRICS_PORT")
    """Port of Prometheus /metrics and the probes /livez and /readyz; 0 disables."""
    metrics_host: str = setting("127.0.0.1", env="WORKER_METRICS_HOST")
    """Address /metrics binds: loopback unless a scraper elsewhere needs it (0.0.0.0)."""

    def __post_init__(self) -> None:
        if self.lease_ms < 1000:
            raise InvalidRequestError("lease_ms", "must be >= 1000")
        if self.heartbeat_s <= 0 or self.drain_timeout_s < 0:
            raise InvalidRequestError("heartbeat_s", "heartbeat must be > 0, drain >= 0")
        if self.liveness_timeout_s <= 0:
            raise InvalidRequestError("liveness_timeout_s", "must be > 0")
        if self.step_warn_s <= 0 or self.step_timeout_s < 0:
            raise InvalidRequestError("step_warn_s", "step_warn_s must be > 0 and "
                                      "step_timeout_s >= 0")
