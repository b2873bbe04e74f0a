"""Prometheus metrics of the gateway, served on --metrics-port when it is set.

Module-level collectors in the default registry, as prometheus_client intends: one set per
process however many gateways a test starts.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)

RPCS = Counter(
    "npuserve_gateway_rpcs_total", "RPCs answered, by method and final gRPC status code.",
    ["method", "code"])
STREAMS_ACTIVE = Gauge(
    "npuserve_gateway_streams_active", "Generate/Chat streams in progress on this gateway.")
REQUESTS = Counter(
    "npuserve_gateway_requests_total", "Generation requests that ended, by model and finish "
    "reason (stop, length, cancelled, deadline, error, disconnected, unavailable).",
    ["model", "finish_reason"])
PROMPT_TOKENS = Counter(
    "npuserve_gateway_prompt_tokens_total", "Prompt tokens of queued requests.", ["model"])
GENERATED_TOKENS = Counter(
    "npuserve_gateway_generated_tokens_total", "Tokens relayed to clients.", ["model"])
QUEUE_WAIT = Histogram(
    "npuserve_gateway_queue_wait_seconds", "Enqueue to a worker's claim, as the worker saw it.",
    ["model"], buckets=_LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram(
    "npuserve_gateway_time_to_first_token_seconds", "RPC start to the first token relayed.",
    ["model"], buckets=_LATENCY_BUCKETS)
REQUEST_DURATION = Histogram(
    "npuserve_gateway_request_duration_seconds", "RPC start to the last message of a stream.",
    ["model"], buckets=_LATENCY_BUCKETS)
RELAY_ENTRIES = Counter(
    "npuserve_gateway_relay_entries_total", "Reply stream entries read (one per worker step).")
RELAY_DUPLICATES = Counter(
    "npuserve_gateway_relay_duplicates_total", "Reply events dropped as already delivered.")
RELAY_OUT_OF_ORDER = Counter(
    "npuserve_gateway_relay_out_of_order_total", "Reply events held back for an earlier one.")
RELAY_RECONNECTS = Counter(
    "npuserve_gateway_relay_reconnects_total", "Failed reads of the reply stream (Redis down).")
AUTH_FAILURES = Counter(
    "npuserve_gateway_auth_failures_total", "Calls refused for their API key, by reason "
    "(missing, unknown).", ["reason"])
KEY_LIMITED = Counter(
    "npuserve_gateway_key_limited_total", "Requests refused by a per-key limit, by key name "
    "and limit (max_streams, tokens_per_minute).", ["key", "limit"])
KEY_TOKENS = Counter(
    "npuserve_gateway_key_tokens_total", "Prompt and completion tokens charged to API keys.",
    ["key"])


def serve_metrics(port: int, host: str = "127.0.0.1") -> WSGIServer | None:
    """Expose /metrics on `port` from a background thread; 0 disables. Returns the HTTP
    server (call its shutdown() to stop it)."""
    if not port:
        return None
    server, _ = start_http_server(port, addr=host)
    return server
