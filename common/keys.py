"""Every Redis key npuserve uses, in one place, under one configurable prefix.

Names in braces are Redis Cluster hash tags: every key of one model's queue and of the
requests queued for it hashes to one slot ({model}), so each script and transaction touches
one slot; so do an API key's counters ({key}) and a gateway's registration and reply stream
({gateway}). Different models, gateways and API keys spread over a cluster's shards.

| key                        | type   | holds                                                    |
| -------------------------- | ------ | -------------------------------------------------------- |
| q:{model}                  | ZSET   | queued request ids; score = priority * 1e13 - enqueue_ms |
| req:{model}:ID             | HASH   | the request: payload (JSON), model, gateway, score, ...  |
|                            |        | once finished, `final` (its last event), kept a while    |
| toks:{model}:ID            | LIST   | tokens already published, so a re-queued request resumes |
|                            |        | (and a client resumes its stream at another gateway)     |
| cancel:{model}:ID          | STRING | present (with a TTL) once a running request is cancelled |
| rid:ID                     | STRING | the model of request ID (Cancel and Resume name only ID) |
| lease:{model}              | ZSET   | claimed request ids; score = lease expiry (ms)           |
| wake:{model}               | LIST   | a nudge per enqueue, so idle workers block, not poll     |
| reaper:{model}             | STRING | which worker reaps the model's leases this heartbeat     |
| replies:{gateway}          | STREAM | token events for every request of one gateway            |
| gateway:{gateway}          | HASH   | a gateway's registration; expires unless heartbeated     |
| worker:ID                  | HASH   | a worker's registration; expires unless heartbeated      |
| workers                    | ZSET   | worker ids; score = last heartbeat (ms)                  |
| model:NAME                 | HASH   | tokenizer files and limits, published by its workers     |
| kstreams:{key}             | ZSET   | an API key's open streams, fleet-wide; score = expiry    |
| ktokens:{key}:MINUTE       | STRING | tokens an API key was charged in one minute (unix min)   |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "npuserve:"

    def queue(self, model: str) -> str:
        return f"{self.prefix}q:{{{model}}}"

    def request(self, model: str, request_id: str) -> str:
        return f"{self.prefix}req:{{{model}}}:{request_id}"

    def tokens(self, model: str, request_id: str) -> str:
        return f"{self.prefix}toks:{{{model}}}:{request_id}"

    def cancel(self, model: str, request_id: str) -> str:
        return f"{self.prefix}cancel:{{{model}}}:{request_id}"

    def request_model(self, request_id: str) -> str:
        return f"{self.prefix}rid:{request_id}"

    def leases(self, model: str) -> str:
        return f"{self.prefix}lease:{{{model}}}"

    def wake(self, model: str) -> str:
        return f"{self.prefix}wake:{{{model}}}"

    def reaper(self, model: str) -> str:
        return f"{self.prefix}reaper:{{{model}}}"

    def replies(self, gateway_id: str) -> str:
        return f"{self.prefix}replies:{{{gateway_id}}}"

    def gateway(self, gateway_id: str) -> str:
        return f"{self.prefix}gateway:{{{gateway_id}}}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def workers(self) -> str:
        return f"{self.prefix}workers"

    def model(self, model: str) -> str:
        return f"{self.prefix}model:{model}"

    def key_streams(self, key_name: str) -> str:
        return f"{self.prefix}kstreams:{{{key_name}}}"

    def key_tokens(self, key_name: str, minute: int) -> str:
        return f"{self.prefix}ktokens:{{{key_name}}}:{minute}"

    def request_keys(self, model: str, request_id: str) -> list[str]:
        """req, toks and cancel of one request: what CLAIM, REAP and REQUEUE take per id."""
        return [self.request(model, request_id), self.tokens(model, request_id),
                self.cancel(model, request_id)]


GATEWAY_TTL_S = 6
"""A gateway's registration lives this long past its last heartbeat (it beats every second):
workers then drop its queued and running requests, which nobody would read."""
REPLIES_TTL_S = 300
"""A reply stream lives this long past its gateway's last heartbeat (or, once its gateway is
gone, past the first event a worker adds to it)."""

MAX_PRIORITY = 9
"""Priorities run 0 (lowest) to MAX_PRIORITY."""
PRIORITY_SCALE = 10**13
"""score = priority * PRIORITY_SCALE - enqueue_ms: CLAIM scans highest score first, so the
highest priority leaves first, and within one priority the oldest. Integers below 2^53 stay
exact in Redis' doubles; ENQUEUE places a request arriving in the same millisecond as a queued
one of its priority 1/32 below it (scripts.TIE_STEP), so arrival order holds there too."""


def queue_score(priority: int, enqueue_ms: int) -> int:
    return priority * PRIORITY_SCALE - enqueue_ms
