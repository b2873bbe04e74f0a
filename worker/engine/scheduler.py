"""Continuous batching as bookkeeping: which requests run this step, and how many tokens each.

Each step spends a token budget: running requests first (a decode costs one token, an
unfinished prompt its next chunk), then waiting requests in arrival order, whose prompts are
chunked to fit what is left. That single rule gives continuous batching (requests join and
leave between steps) and chunked prefill (a long prompt never stalls running streams for more
than one budget). When the KV cache cannot grow, the most recently admitted request is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
from its prompt and the tokens it already produced.

No torch, Redis or gRPC here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from worker.backends.base import BackendCapacity
from worker.engine.block_manager import BlockManager
from worker.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    num_tokens: int
    """Tokens fed this step, starting at request.num_computed_tokens."""

    @property
    def sample(self) -> bool:
        r = self.request
        return r.num_computed_tokens + self.num_tokens == r.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, capacity: BackendCapacity) -> None:
        self.capacity = capacity
        self.blocks = BlockManager(capacity.num_blocks, capacity.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self._by_id[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.capacity.max_tokens_per_step
        admit_first = not self.capacity.mixed_batches and self._can_admit_head(budget)
        i = 0
        while i < len(self.running) and budget > 0 and not admit_first:
            req = self.running[i]
            n = self._chunk_size(req, budget)
            if n == 0:
                i += 1
                continue
            while not self.blocks.can_grow(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                self.blocks.grow(req, req.num_computed_tokens + n)
                out.chunks.append(ScheduledChunk(req, n))
                budget -= n
                i += 1
        if out.preempted or (out.chunks and not self.capacity.mixed_batches):
            return out
        while self.waiting and budget > 0 and len(self.running) < self.capacity.max_batch:
            req = self.waiting[0]
            n = self._chunk_size(req, budget)
            if n == 0 or not self.blocks.can_grow(req, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            self.blocks.grow(req, req.num_computed_tokens + n)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled: Iterable[int]) -> list[Request]:
        """Record a step's results; sampled holds one token per chunk with sample=True.

        Returns the requests that received a token, in step order. Those that finished by
        EOS, a stop token or length are already marked finished and their blocks freed.
        """
        tokens = iter(sampled)
        advanced = []
        for chunk in out.chunks:
            req = chunk.request
            sample = chunk.sample
            req.num_computed_tokens += chunk.num_tokens
            if not sample:
                continue
            token = next(tokens)
            req.token_ids.append(token)
            advanced.append(req)
            status = self._stop_status(req, token)
            if status is not None:
                self.finish(req, status)
        return advanced

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (also used by the engine for stop strings and aborts)."""
        if req.status.finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.status = status
        self.blocks.free(req)
        self._by_id.pop(req.request_id, None)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def _chunk_size(self, req: Request, budget: int) -> int:
        remaining = req.num_tokens - req.num_computed_tokens
        n = min(remaining, budget)
        if n < remaining and not self.capacity.chunked_prefill:
            return 0
        return n

    def _can_admit_head(self, budget: int) -> bool:
        if not self.waiting or len(self.running) >= self.capacity.max_batch:
            return False
        req = self.waiting[0]
        n = self._chunk_size(req, budget)
        return n > 0 and self.blocks.can_grow(req, n)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.blocks.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        out.preempted.append(req)

    @staticmethod
    def _stop_status(req: Request, token: int) -> RequestStatus | None:
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in req.eos_token_ids):
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= req.max_len:
            return RequestStatus.FINISHED_LENGTH
        return None
