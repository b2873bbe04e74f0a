"""Prometheus metrics of the gateway, served on --metrics-port when it is set.

Module-level collectors in the default registry, as prometheus_client intends: one set per
process however many gateways a test starts. Two kinds:

- `npuserve_gateway_*`: what this gateway did (its RPCs, streams, latencies as its clients
  saw them); sum them over gateways.
- `npuserve_queue_*`, `npuserve_requests_*`, `npuserve_workers*`: the fleet as Redis shows
  it (queue depth, leases, live workers), read by every gateway each health beat; every
  gateway reports the same values, so take `max by (model)`, not the sum.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

from common.errors import NpuserveError
from common.metrics_http import process_metrics

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                   0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
"""Resolves 5 ms to 60 s (and beyond, for long generations' end-to-end time)."""
LENGTH_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768,
                  65536, 131072)

process_metrics("gateway")

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
    ["model"], buckets=LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram(
    "npuserve_gateway_time_to_first_token_seconds", "RPC start to the first token relayed.",
    ["model"], buckets=LATENCY_BUCKETS)
REQUEST_DURATION = Histogram(
    "npuserve_gateway_request_duration_seconds", "End-to-end latency: RPC start to the last "
    "message of a stream.", ["model"], buckets=LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram(
    "npuserve_gateway_inter_token_latency_seconds", "Time between two tokens of one stream "
    "as relayed to its client.", ["model"], buckets=LATENCY_BUCKETS)
REQUEST_PROMPT_TOKENS = Histogram(
    "npuserve_gateway_request_prompt_tokens", "Prompt length of queued requests, in tokens.",
    ["model"], buckets=LENGTH_BUCKETS)
REQUEST_COMPLETION_TOKENS = Histogram(
    "npuserve_gateway_request_completion_tokens", "Completion length of ended requests, in "
    "tokens.", ["model"], buckets=LENGTH_BUCKETS)
REJECTED = Counter(
    "npuserve_gateway_rejected_requests_total", "Generation requests refused before they were "
    "queued, by model (empty when the request named no served model) and reason (the error "
    "code: invalid_argument, resource_exhausted, not_found, permission_denied, unavailable, "
    "...).", ["model", "reason"])
HTTP_REQUESTS = Counter(
    "npuserve_gateway_http_requests_total", "HTTP requests answered, by path (other: any "
    "path the gateway does not serve) and status code.", ["path", "status"])
HTTP_DURATION = Histogram(
    "npuserve_gateway_http_request_duration_seconds", "HTTP request to the end of its "
    "response (a stream's last event).", ["path"], buckets=LATENCY_BUCKETS)
SERVING = Gauge(
    "npuserve_gateway_serving", "1 while this gateway reports SERVING (Redis reachable and an "
    "accepting worker), else 0.")
QUEUE_DEPTH = Gauge(
    "npuserve_queue_depth", "Requests queued for the model and not yet claimed (ZCARD).",
    ["model"])
QUEUE_OLDEST_AGE = Gauge(
    "npuserve_queue_oldest_age_seconds", "How long the longest-waiting queued request of the "
    "model has waited (0 when none waits).", ["model"])
REQUESTS_LEASED = Gauge(
    "npuserve_requests_leased", "Requests of the model claimed by a worker and not finished.",
    ["model"])
REQUESTS_RUNNING = Gauge(
    "npuserve_requests_running", "Requests the model's live workers report running.",
    ["model"])
WORKERS = Gauge(
    "npuserve_workers", "Live workers of the model (registration not expired), by backend.",
    ["model", "backend"])
WORKERS_ACCEPTING = Gauge(
    "npuserve_workers_accepting", "Live workers of the model that claim new requests (not "
    "draining), by backend.", ["model", "backend"])
WORKER_SLOTS = Gauge(
    "npuserve_worker_slots", "Requests the model's live accepting workers can run at once.",
    ["model"])
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


@contextmanager
def counting_rejections(model: str = "") -> Iterator[None]:
    """Count an NpuserveError raised inside as a rejected request of `model` (pass "" unless
    the model is resolved: a client's made-up names must never become series)."""
    try:
        yield
    except NpuserveError as exc:
        REJECTED.labels(model, exc.code.value.lower()).inc()
        raise


class ModelSeries:
    """The per-model series a stream touches for every token, looked up once per model
    (a `.labels()` lookup takes a lock and a dict probe: per token, at 10,000 tokens/s, it
    shows in the profile)."""

    def __init__(self, model: str) -> None:
        self.generated = GENERATED_TOKENS.labels(model)
        self.ttft = TIME_TO_FIRST_TOKEN.labels(model)
        self.itl = INTER_TOKEN_LATENCY.labels(model)
        self.queue_wait = QUEUE_WAIT.labels(model)
        self.duration = REQUEST_DURATION.labels(model)


_SERIES: dict[str, ModelSeries] = {}


def series(model: str) -> ModelSeries:
    """The model's ModelSeries (models are few: a worker's registration names them)."""
    found = _SERIES.get(model)
    if found is None:
        found = _SERIES[model] = ModelSeries(model)
    return found
