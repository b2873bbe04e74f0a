"""Continuous batching as bookkeeping: which requests run this step, and how many tokens each.

Each step spends a token budget: running requests first (a decode costs one token, an
unfinished prompt its next chunk), then waiting requests in arrival order, whose prompts are
chunked to fit what is left. That single rule gives continuous batching (requests join and
leave between steps) and chunked prefill (a long prompt never stalls running streams for
more than one budget). While requests are decoding, the prefill chunks of a step (running
prompts and admissions together) may also be capped by the caller (`schedule(prefill_cap)`,
which the engine derives from its step times: `PrefillBudget`), down to one token a step; a
cap of 0 (no step time measured yet) means one KV block a step. The cap is for later
arrivals: requests that arrived before the decoding ones had their first tokens prefill
outside it, it lifts in a burst, while more requests await prefill than decode, and it rises
as far as every capped prompt needs to have its first token within its bound (about one
step for every FIRST_TOKEN_RATE tokens). The decodes' own tokens are set aside first, so a
chunk never crowds them out. When the KV cache cannot grow, the most recently admitted
request is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed from its prompt and the tokens it already produced.

With prefix caching (`BackendCapacity.prefix_caching`), admission first looks up the longest
run of cached full blocks that starts the request's tokens (see `BlockManager`): those tokens
count as computed and only the rest is prefilled, in chunks as usual. A preempted request
frees its blocks like any other and finds again, when it resumes, whatever is still cached.

No torch, Redis or gRPC here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice

from worker.backends.base import BackendCapacity
from worker.engine.block_manager import BlockManager
from worker.engine.request import Request, RequestStatus


def _never(req: Request) -> bool:
    """No request prefills outside the cap (there is none)."""
    return False


DECODE_ONLY = -1
"""A prefill cap for a step that runs its decodes alone (so that their time is measured
again), within the same lifts as any cap."""

FIRST_TOKEN_RATE = 8
"""Prompt tokens a step at the least that a capped request's first-token bound allows for:
it has its first token within ceil(tokens / this) steps of its arrival, FIRST_TOKEN_STEPS at
most. The cap rises to each awaiting request's remaining tokens over the steps it has left,
so that prompts arriving faster than the cap prefills them do not queue without end.

SmolLM2 on 2 Zen 5 cores, stall 0.5:
- 8 streams, a 512-token prompt every ~3 s (two runs each): within 64 steps the arrivals'
  first token took 2.4 s on average (no cap: 0.55 s) and the streams' p99 gap was
  1.64-1.87x their p50; within 32, 1.6 s and 2.00x (16 tokens a step, above the cap's 9-11,
  in every mixed step);
- the whole stack, 16 requests in flight (128 prompt tokens, 64 out, one run each; before
  the cap's keep-up floor, `PrefillBudget`): with 64 steps for any prompt, the first
  token's p50 was 1.7 s against 0.21 s uncapped (the cap's dozen tokens a step fell behind
  the prompts' arrivals, and the bound set the pace);
  with 16 steps for 128 tokens (this rate), 0.68 s, at x0.94 the uncapped throughput and a
  p99 gap of 105 ms against 236; at 16 tokens a step, 0.47 s and x0.99, but the streams'
  p99 gap beside 512-token prompts was 1.82-2.15x their p50 in three runs (at 12: 1.91,
  2.10), where 8 kept it within 1.64-1.87x."""

FIRST_TOKEN_STEPS = 64
"""The most steps a capped request's first-token bound gives it (`FIRST_TOKEN_RATE`)."""


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
class PrefixCacheStats:
    """Counters since the scheduler started; the hit rate is cached_tokens / prompt_tokens."""

    prompt_tokens: int = 0
    """Tokens admitted requests needed in the KV cache before their next token: the prompt,
    and the tokens already generated of a preempted or resumed request. Counted at every
    admission."""
    cached_tokens: int = 0
    """Of those, tokens found in the prefix cache rather than computed."""


@dataclass(frozen=True, slots=True)
class StepStats:
    """What one step ran, for the worker's metrics."""

    num_seqs: int = 0
    prompt_tokens: int = 0
    """Tokens of prefill chunks: prompts, and the recomputed tokens of resumed requests."""
    decode_seqs: int = 0
    """Sequences fed one token after their output so far."""
    preempted: int = 0

    @property
    def phase(self) -> str:
        """"prefill", "decode" or "mixed"."""
        if not self.decode_seqs:
            return "prefill"
        return "mixed" if self.prompt_tokens else "decode"


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def stats(self) -> StepStats:
        """Call before the step's update (it advances the requests' computed tokens)."""
        decode = sum(1 for c in self.chunks if c.num_tokens == 1 and c.sample
                     and c.request.num_output_tokens > 0)
        return StepStats(len(self.chunks), self.num_tokens - decode, decode,
                         len(self.preempted))


class Scheduler:
    def __init__(self, capacity: BackendCapacity) -> None:
        self.capacity = capacity
        self.blocks = BlockManager(capacity.num_blocks, capacity.block_size,
                                   caching=capacity.prefix_caching)
        self.stats = PrefixCacheStats()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self._steps = 0
        """Steps scheduled so far: the clock of requests' arrivals and first tokens."""

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self._by_id[request.request_id] = request
        request.arrival_step = self._steps
        self.waiting.append(request)

    def schedule(self, prefill_cap: int | None = None, prefill_floor: int = 0
                 ) -> SchedulerOutput:
        """The next step's chunks. `prefill_cap`: most prefill tokens in a step that also
        decodes (0: one KV block, DECODE_ONLY: none); None leaves prefill the whole budget.
        `prefill_floor`: prefill tokens a capped step may carry whatever the cap (the
        engine's keep-up floor), as the first-token bound does."""
        self._steps += 1
        out = SchedulerOutput()
        budget = self.capacity.max_tokens_per_step
        prefill = self._prefill_room(prefill_cap, prefill_floor)
        # without a cap every prompt takes the whole room: no need to look at arrivals
        elder = self._elder_than_streams() if prefill_cap is not None else _never
        admit_first = not self.capacity.mixed_batches and self._can_admit_head(budget)
        i = 0
        while i < len(self.running) and budget > 0 and not admit_first:
            req = self.running[i]
            decode = self._is_decode(req)
            n = self._chunk_size(req, budget if decode or elder(req) else min(budget, prefill))
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
                if not decode:
                    prefill = max(prefill - n, 0)
                i += 1
        if out.preempted or (out.chunks and not self.capacity.mixed_batches):
            return out
        while self.waiting and budget > 0 and len(self.running) < self.capacity.max_batch:
            req = self.waiting[0]
            admission = self._admission(req, budget if elder(req) else min(budget, prefill))
            if admission is None:
                break
            cached, n = admission
            self.waiting.popleft()
            num_cached = len(cached) * self.blocks.block_size
            self.blocks.allocate(req, num_cached + n, cached)
            req.num_computed_tokens = req.num_cached_tokens = num_cached
            self.stats.prompt_tokens += req.num_tokens
            self.stats.cached_tokens += num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
            prefill = max(prefill - n, 0)
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
            self.blocks.cache_full_blocks(req)
            if not sample:
                continue
            token = next(tokens)
            if req.first_token_step is None:
                req.first_token_step = self._steps
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

    def _prefill_room(self, prefill_cap: int | None, prefill_floor: int) -> int:
        """Prefill tokens this step may carry: the budget less the running decodes' tokens,
        within the cap while any decode runs, one KV block if the cap is 0 (and then within
        the backend's one-call step where a block of prefill fits beside the decodes).
        Backends that cannot chunk prompts or mix them with decodes keep the whole budget (a
        cap would starve their prompts).

        The cap holds while the requests with prefill to do (running, or waiting with room in
        the batch) are at most as many as the decoding ones, and lifts in a burst of more (a
        burst of 14 arriving beside 2 streams, SmolLM2 on 2 Zen 4 cores, stall 0.5: x0.91-0.92
        the uncapped throughput with the lift, x0.79-0.94 without). Requests that arrived
        before the streams began are outside the cap anyway (`_elder_than_streams`)."""
        budget = self.capacity.max_tokens_per_step
        if not (self.capacity.chunked_prefill and self.capacity.mixed_batches):
            return budget
        decodes = self.num_decoding()
        room = budget - decodes
        if not decodes or prefill_cap is None:
            return max(room, 0)
        awaiting = self._awaiting()
        if len(awaiting) > decodes:  # a burst
            return max(room, 0)
        if prefill_cap == DECODE_ONLY:
            return 0
        cap = prefill_cap if prefill_cap > 0 else self.capacity.block_size
        one_call = self.capacity.one_call_tokens - decodes
        if one_call >= self.capacity.block_size:
            cap = min(cap, one_call)
        floor = max(self._first_token_tokens(awaiting), prefill_floor)
        return max(min(room, max(cap, floor)), 0)

    def _first_token_tokens(self, awaiting: list[Request]) -> int:
        """Prefill tokens this step needs for every awaiting request to have its first token
        within its bound (`FIRST_TOKEN_RATE`): the sum of each one's remaining tokens over
        the steps it has left (at least this one)."""
        need = 0
        for req in awaiting:
            within = min(-(-req.num_tokens // FIRST_TOKEN_RATE), FIRST_TOKEN_STEPS)
            left = max(req.arrival_step + within + 1 - self._steps, 1)
            need += -(-(req.num_tokens - req.num_computed_tokens) // left)
        return need

    def _elder_than_streams(self) -> Callable[[Request], bool]:
        """Whether a request arrived before every decoding request had its first token. Those
        prefill outside the cap, which bounds what later arrivals add to running streams'
        gaps: a batch arriving together, capped behind its own first streams, kept half of
        itself prefilling a dozen tokens a step (SmolLM2 on 2 Zen 4 cores, 16 or 32 requests
        at batch 16, stall 0.5: x0.62-0.82 the uncapped throughput; with this the same steps
        as uncapped)."""
        started = [r.first_token_step for r in self.running
                   if r.first_token_step is not None and self._is_decode(r)]
        since = min(started, default=None)
        return lambda req: since is None or req.arrival_step < since

    def num_decoding(self) -> int:
        """Running requests whose next chunk is a decode."""
        return sum(1 for r in self.running if self._is_decode(r))

    def _awaiting(self) -> list[Request]:
        """Requests with prefill to do that this step could feed: the running ones not
        decoding and the waiting ones the batch has room for."""
        room = max(self.capacity.max_batch - len(self.running), 0)
        return [r for r in self.running if not self._is_decode(r)] + list(
            islice(self.waiting, room))

    @staticmethod
    def _is_decode(req: Request) -> bool:
        """Its next chunk is the one token after its output so far (a resumed request's
        recomputation is prefill)."""
        return req.num_output_tokens > 0 and req.num_computed_tokens == req.num_tokens - 1

    def _chunk_size(self, req: Request, budget: int, computed: int | None = None) -> int:
        """Tokens the request can feed this step after `computed` (its own count if None)."""
        remaining = req.num_tokens - (req.num_computed_tokens if computed is None else computed)
        n = min(remaining, budget)
        if n < remaining and not self.capacity.chunked_prefill:
            return 0
        return n

    def _admission(self, req: Request, budget: int) -> tuple[list[int], int] | None:
        """For a waiting request: its cached prefix blocks and the tokens to feed after them
        this step, or None if it cannot start now (no budget left for it, or no KV room)."""
        cached = self.blocks.cached_prefix(req)
        num_cached = len(cached) * self.blocks.block_size
        n = self._chunk_size(req, budget, num_cached)
        if n == 0 or not self.blocks.can_allocate(num_cached + n, cached):
            return None
        return cached, n

    def _can_admit_head(self, budget: int) -> bool:
        if not self.waiting or len(self.running) >= self.capacity.max_batch:
            return False
        return self._admission(self.waiting[0], budget) is not None

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
