"""Every Redis key npuserve uses, in one place, under one configurable prefix.

| key                     | type   | holds                                                     |
| ----------------------- | ------ | --------------------------------------------------------- |
| q:{model}               | ZSET   | queued request ids; score = priority * 1e13 - enqueue_ms  |
| req:{id}                | HASH   | the request: payload (JSON), model, gateway, score, ...   |
|                         |        | once finished, `final` (its last event), kept a while     |
| toks:{id}               | LIST   | tokens already published, so a re-queued request resumes  |
|                         |        | (and a client resumes its stream at another gateway)      |
| lease:{model}           | ZSET   | claimed request ids; score = lease expiry (ms)            |
| replies:{gateway}       | STREAM | token events for every request of one gateway             |
| cancel:{id}             | STRING | present (with a TTL) once a running request is cancelled  |
| wake:{model}            | LIST   | a nudge per enqueue, so idle workers block instead of poll |
| worker:{id}             | HASH   | a worker's registration; expires unless heartbeated       |
| workers                 | ZSET   | worker ids; score = last heartbeat (ms)                   |
| model:{model}           | HASH   | tokenizer files and limits, published by its workers      |
| gateway:{id}            | HASH   | a gateway's registration; expires unless heartbeated      |
| kstreams:{key}          | ZSET   | an API key's open streams, fleet-wide; score = expiry (ms) |
| ktokens:{key}:{minute}  | STRING | tokens an API key was charged in one minute (unix min)    |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "npuserve:"

    def queue(self, model: str) -> str:
        return f"{self.prefix}q:{model}"

    def request(self, request_id: str) -> str:
        return f"{self.prefix}req:{request_id}"

    def tokens(self, request_id: str) -> str:
        return f"{self.prefix}toks:{request_id}"

    def leases(self, model: str) -> str:
        return f"{self.prefix}lease:{model}"

    def replies(self, gateway_id: str) -> str:
        return f"{self.prefix}replies:{gateway_id}"

    def cancel(self, request_id: str) -> str:
        return f"{self.prefix}cancel:{request_id}"

    def wake(self, model: str) -> str:
        return f"{self.prefix}wake:{model}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def workers(self) -> str:
        return f"{self.prefix}workers"

    def model(self, model: str) -> str:
        return f"{self.prefix}model:{model}"

    def gateway(self, gateway_id: str) -> str:
        return f"{self.prefix}gateway:{gateway_id}"

    def key_streams(self, key_name: str) -> str:
        return f"{self.prefix}kstreams:{key_name}"

    def key_tokens(self, key_name: str, minute: int) -> str:
        return f"{self.prefix}ktokens:{key_name}:{minute}"


GATEWAY_TTL_S = 6
"""A gateway's registration lives this long past its last heartbeat (it beats every second):
workers then drop its queued and running requests, which nobody would read."""
REPLIES_TTL_S = 300
"""A reply stream lives this long past its gateway's last heartbeat (or, once its gateway is
gone, past the first event a worker adds to it)."""

PRIORITY_SCALE = 10**13
"""score = priority * PRIORITY_SCALE - enqueue_ms: CLAIM scans highest score first, so the
highest priority leaves first, and within one priority the oldest. Integers below 2^53 stay
exact in Redis' doubles; ENQUEUE places a request arriving in the same millisecond as a queued
one of its priority 1/32 below it (scripts.TIE_STEP), so arrival order holds there too."""


def queue_score(priority: int, enqueue_ms: int) -> int:
    return priority * PRIORITY_SCALE - enqueue_ms
