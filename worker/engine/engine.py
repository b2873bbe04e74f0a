"""The engine: requests in, token events out, one scheduler step at a time.

    engine = Engine.from_model_dir("models/smollm2-135m-instruct")
    done = engine.generate([prompt_ids], SamplingParams(max_tokens=32, temperature=0))

For serving, call add_request / abort between step() calls; each step returns the token
events of that step. No Redis, gRPC or tokenizer here: the engine deals in token ids, and
whoever shows text detokenizes (the gateway's output processor, or an offline tool).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from common.capabilities import unsupported
from common.config import EngineConfig
from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams
from worker.backends.base import Backend, OutputKind, SequenceChunk
from worker.backends.registry import create_backend
from worker.engine.outputs import Completion, TokenEvent
from worker.engine.prefill_budget import PrefillBudget
from worker.engine.request import Request, RequestStatus
from worker.engine.sampler import (
    Sampler,
    SampleResult,
    SampleRow,
    make_generator,
    skip_draws,
)
from worker.engine.scheduler import PrefixCacheStats, Scheduler, SchedulerOutput, StepStats
from worker.model.config import ModelConfig

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, backend: Backend, config: EngineConfig | None = None) -> None:
        """`config`: the settings the backend was made with; the engine reads its own
        (max_prefill_stall) from it, the defaults when None."""
        self.backend = backend
        self.model_config: ModelConfig = backend.model_config
        self.scheduler = Scheduler(backend.capacity)
        self.sampler = Sampler()
        self._eos = frozenset(self.model_config.eos_token_ids)
        self.failed: dict[str, str] = {}
        """Requests the last step dropped because their device call failed -> the failure.
        They are no longer in the engine; the caller decides whether to retry them."""
        self.last_step = StepStats()
        """What the last step ran."""
        stall = (config or EngineConfig()).max_prefill_stall
        self.prefill_budget = PrefillBudget(backend.capacity.prefill_stall if stall is None
                                            else stall)
        """The prefill cap of steps that decode, learned from the steps' times."""

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: EngineConfig | None = None,
                       backend: str = "torch", settings: Any = None) -> Engine:
        return cls(create_backend(backend, model_dir, config, settings), config)

    @property
    def prefix_caching(self) -> bool:
        """Whether requests re-use the cached KV blocks of a common prefix."""
        return self.scheduler.blocks.caching

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt tokens admitted and, of those, found cached, since the engine started."""
        return self.scheduler.stats

    @property
    def max_len(self) -> int:
        """Longest prompt + completion a request may reach."""
        return self.backend.capacity.max_seq_len

    def weight_bytes(self) -> int:
        return self.backend.weight_bytes()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None, output_ids: Sequence[int] = ()) -> str:
        """Validate and queue a request; raises InvalidRequestError naming the bad field.

        `output_ids` resumes a request another engine started: those tokens count as output
        (max_tokens, presence/frequency penalties) and a seeded generator skips the draws that
        produced them, so the continuation is exactly what an uninterrupted run would give.
        """
        request_id = request_id or uuid.uuid4().hex
        self._validate(prompt_ids, output_ids, params, request_id)
        req = Request(request_id, list(prompt_ids), params, self._eos, self.max_len)
        req.token_ids.extend(output_ids)
        if not params.greedy:
            req.generator = make_generator(params.seed, self._sample_device())
            skip_draws(req.generator, len(output_ids))
        self.scheduler.add(req)
        self.prefill_budget.arrived(req.num_tokens)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request now; its KV blocks are free before the next step. False if unknown."""
        req = self.scheduler.get(request_id)
        if req is None:
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self.backend.release(request_id)
        return True

    def step(self) -> list[TokenEvent]:
        self.failed = {}
        out = self.scheduler.schedule(
            *self.prefill_budget.limits(self.scheduler.num_decoding()))
        self.last_step = out.stats()
        for req in out.preempted:
            self.backend.release(req.request_id)
            log.info("preempted %s (KV cache full); it will resume", req.request_id)
        if not out.chunks:
            return []
        start = time.perf_counter()
        s = self._execute(out)
        advanced = self.scheduler.update(out, s.token_ids)
        if not self.failed:  # a step that dropped requests ran less than its stats say
            self.prefill_budget.observe(self.last_step, time.perf_counter() - start)
        top = s.top or [None] * len(advanced)
        return [self._event(req, lp, t)
                for req, lp, t in zip(advanced, s.logprobs, top, strict=True)]

    def steps(self) -> Iterator[list[TokenEvent]]:
        """Step until every request has finished, yielding each step's events."""
        while self.has_unfinished():
            yield self.step()

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams],
                 progress: Callable[[int], None] | None = None) -> list[Completion]:
        """Run the prompts to completion with continuous batching; results in prompt order."""
        per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(prompts):
            raise InvalidRequestError("params", f"{len(per)} settings for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per, strict=True)]
        results: dict[str, Completion] = {
            rid: Completion(rid, list(p), [], None, [] if sp.logprobs else None)
            for rid, p, sp in zip(ids, prompts, per, strict=True)
        }
        for events in self.steps():
            for e in events:
                c = results[e.request_id]
                c.token_ids.append(e.token_id)
                c.finish_reason = e.finish_reason
                if c.logprobs is not None and e.logprob is not None:
                    c.logprobs.append(e.logprob)
            if progress is not None:
                progress(len(events))
        return [results[rid] for rid in ids]

    def _execute(self, out: SchedulerOutput) -> SampleResult:
        chunks = [
            SequenceChunk(c.request.request_id,
                          c.request.token_ids[c.request.num_computed_tokens:
                                              c.request.num_computed_tokens + c.num_tokens],
                          c.request.num_computed_tokens, c.request.block_ids, c.sample,
                          c.request.params)
            for c in out.chunks
        ]
        result = self.backend.execute(chunks)
        if result.failed:
            self._drop_failed(out, result.failed)
        sampled = [c.request for c in out.chunks if c.sample]
        if self.backend.capacity.output == OutputKind.TOKENS:
            assert result.token_ids is not None
            return SampleResult(result.token_ids, [None] * len(sampled))
        if not sampled:
            return SampleResult([], [])
        assert result.logits is not None
        rows = [SampleRow(r.params, r.prompt_ids, r.output_ids, r.generator) for r in sampled]
        return self.sampler(result.logits, rows)

    def _drop_failed(self, out: SchedulerOutput, failed: dict[str, str]) -> None:
        """Take the requests whose device call failed out of the step and the engine."""
        out.chunks = [c for c in out.chunks if c.request.request_id not in failed]
        for rid, what in failed.items():
            req = self.scheduler.get(rid)
            if req is not None:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
                self.backend.release(rid)
            log.error("request %s: device call failed: %s", rid, what)
        self.failed = dict(failed)

    def _event(self, req: Request, logprob: float | None,
               top: list[tuple[int, float]] | None) -> TokenEvent:
        if req.status.finished:
            self.backend.release(req.request_id)
        return TokenEvent(req.request_id, req.num_output_tokens - 1, req.token_ids[-1], logprob,
                          req.finish_reason, top)

    def _validate(self, prompt_ids: Sequence[int], output_ids: Sequence[int],
                  params: SamplingParams, request_id: str) -> None:
        vocab = self.model_config.vocab_size
        if request_id in self.scheduler:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        if len(prompt_ids) == 0:
            raise InvalidRequestError("prompt", "is empty; send at least one token")
        if len(prompt_ids) + len(output_ids) >= self.max_len:
            raise InvalidRequestError(
                "prompt", f"has {len(prompt_ids)} tokens but this model accepts at most "
                f"{self.max_len - 1 - len(output_ids)} (context {self.max_len}, "
                f"{len(output_ids)} already generated, one token left to generate)")
        for name, ids in (("prompt", prompt_ids), ("output_ids", output_ids)):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(name, f"token id {bad} is outside the vocabulary "
                                          f"[0, {vocab})")
        params.validate(vocab)
        if (refused := unsupported(params, self.backend.capabilities)) is not None:
            raise refused
        if len(output_ids) >= params.max_tokens:
            raise InvalidRequestError(
                "output_ids", f"{len(output_ids)} tokens already reach max_tokens "
                f"({params.max_tokens}); nothing is left to generate")

    def _sample_device(self) -> Any:
        return self.backend.logits_device
