"""What travels through Redis between gateways and workers, and how it is encoded.

A queued request is a hash of string fields (req:{id}); a worker's replies for one gateway
are one stream entry per engine step, whose field `e` holds a JSON list of events. Events carry
token ids, indices and typed outcomes, never text: the gateway detokenizes and applies stop
strings, so a request resumed on another worker continues exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from common.capabilities import field_mask, requested
from common.errors import ErrorCode
from common.sampling_params import SamplingParams


@dataclass(slots=True)
class QueuedRequest:
    request_id: str
    model: str
    gateway_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0
    enqueue_ms: int = 0
    deadline_ms: int = 0
    """Absolute wall-clock deadline in ms since the epoch; 0 means none."""
    published_ids: list[int] = field(default_factory=list)
    """Tokens already streamed by an earlier worker (set when a request is resumed)."""
    device_failures: int = 0
    """Times a worker's device failed running this request (req:{id} field `failures`, set
    by workers only): a failed request is re-queued once, then failed."""
    tenant: str = ""
    """The tenant of the API key that sent it ("" without API keys); request_id starts
    with it."""

    @property
    def context_len(self) -> int:
        """Prompt plus completion at its longest: a worker with a shorter context never
        claims the request."""
        return len(self.prompt_ids) + self.params.max_tokens

    def to_fields(self, score: int) -> dict[str, str]:
        params = asdict(self.params)
        return {
            "id": self.request_id,
            "model": self.model,
            "gateway": self.gateway_id,
            "prompt": json.dumps(self.prompt_ids),
            "params": json.dumps(params),
            "priority": str(self.priority),
            "enqueue_ms": str(self.enqueue_ms),
            "deadline_ms": str(self.deadline_ms),
            "score": str(score),
            "plen": str(len(self.prompt_ids)),
            "ctx": str(self.context_len),
            "needs": str(field_mask(requested(self.params))),
            "tenant": self.tenant,
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str], published: list[int] | None = None
                    ) -> QueuedRequest:
        raw = json.loads(fields["params"])
        raw["stop"] = tuple(raw.get("stop", ()))
        raw["stop_token_ids"] = tuple(raw.get("stop_token_ids", ()))
        return cls(
            request_id=fields["id"],
            model=fields["model"],
            gateway_id=fields["gateway"],
            prompt_ids=json.loads(fields["prompt"]),
            params=SamplingParams(**raw),
            priority=int(fields.get("priority", "0")),
            enqueue_ms=int(fields.get("enqueue_ms", "0")),
            deadline_ms=int(fields.get("deadline_ms", "0")),
            published_ids=list(published or []),
            device_failures=int(fields.get("failures", "0")),
            tenant=fields.get("tenant", ""),
        )


ORPHANED = "orphaned"
"""The finish reason of a request its worker stopped because its gateway's registration
lapsed (nobody seemed to read its stream). Never shown to a client: a gateway that gets it
for a stream it still serves, or a client resuming the request, queues it again from its
published tokens (ADOPT); the gateway fails the stream with UNAVAILABLE only when that is
no longer possible."""


@dataclass(slots=True)
class ReplyEvent:
    """One token of one request, or a request's end without a token (error, cancellation)."""

    request_id: str
    index: int
    """Position in the completion; -1 for an event that carries no token."""
    token_id: int = -1
    logprob: float | None = None
    finish_reason: str = ""
    """stop, length, cancelled, deadline, error or ORPHANED on the request's last event. "stop"
    on a token event means that token is a stop token (EOS or stop_token_ids): not part of
    the text."""
    code: ErrorCode | None = None
    """For finish_reason "error": the failure's class, reported by the front end."""
    error: str = ""
    """For finish_reason "error": what to change, for the client (names the field)."""
    prompt_tokens: int = 0
    """Usage, on the last event."""
    completion_tokens: int = 0
    queue_ms: int = -1
    """Time from enqueue to the first claim, on index 0."""
    top_logprobs: list[tuple[int, float]] | None = None
    """With top_logprobs: the most likely (token id, log-probability) at this position."""

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"id": self.request_id, "i": self.index}
        if self.token_id >= 0:
            out["t"] = self.token_id
        if self.logprob is not None:
            out["lp"] = self.logprob
        if self.finish_reason:
            out.update(f=self.finish_reason, pt=self.prompt_tokens, ct=self.completion_tokens)
        if self.code is not None:
            out["c"] = self.code.value
        if self.error:
            out["err"] = self.error
        if self.queue_ms >= 0:
            out["qw"] = self.queue_ms
        if self.top_logprobs is not None:
            out["tl"] = [[t, lp] for t, lp in self.top_logprobs]
        return out

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> ReplyEvent:
        code = raw.get("c")
        return cls(
            request_id=str(raw["id"]),
            index=int(raw["i"]),  # type: ignore[call-overload]
            token_id=int(raw.get("t", -1)),  # type: ignore[call-overload]
            logprob=float(raw["lp"]) if "lp" in raw else None,  # type: ignore[arg-type]
            finish_reason=str(raw.get("f", "")),
            code=None if code is None else ErrorCode.parse(str(code)),
            error=str(raw.get("err", "")),
            prompt_tokens=int(raw.get("pt", 0)),  # type: ignore[call-overload]
            completion_tokens=int(raw.get("ct", 0)),  # type: ignore[call-overload]
            queue_ms=int(raw.get("qw", -1)),  # type: ignore[call-overload]
            top_logprobs=None if "tl" not in raw else [
                (int(t), float(lp)) for t, lp in raw["tl"]],  # type: ignore[attr-defined]
        )


def encode_events(events: list[ReplyEvent]) -> str:
    return json.dumps([e.to_json() for e in events], ensure_ascii=False, separators=(",", ":"))


def decode_events(payload: str | bytes) -> list[ReplyEvent]:
    return [ReplyEvent.from_json(raw) for raw in json.loads(payload)]
