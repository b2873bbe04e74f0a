"""What a worker has published, kept so it can write back what a Redis failover lost.

Redis replicates asynchronously: a write the master acknowledged may not have reached the
replica that Sentinel promotes when the master dies (a batch of tokens, a claim, a finished
request's last event, even a request's enqueue). The worker holds the truth of every request
it runs or has just finished: the request itself and its tokens in order. After any of its
Redis calls failed (`RedisQueue.disrupted`), it compares Redis with this log and writes back
what is missing (`RedisQueue.repair`), so the gateways get every event and a request
resumed later finds all its tokens.

A finished request is kept RECENT_S seconds: writes older than that had long reached the
replica before any failover that could still lose them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.protocol import QueuedRequest, ReplyEvent

RECENT_S = 10.0
"""How long a finished request stays in the log."""


@dataclass(slots=True)
class Published:
    """One request as this worker published it."""

    request: QueuedRequest
    """Its gateway is the current one (a resumed stream moves it)."""
    tokens: list[int]
    """The whole completion so far: tokens earlier workers published, then this one's."""
    logprobs: list[float | None] = field(default_factory=list)
    final: ReplyEvent | None = None
    """Its last event, once it finished."""
    finished_at: float = 0.0

    def events(self, start: int) -> list[ReplyEvent]:
        """The events of the tokens from index `start` on, then the final event: what is
        sent again to a gateway that may lack them (it drops those it already has)."""
        rid, final = self.request.request_id, self.final
        out = [ReplyEvent(rid, i, t, self.logprobs[i]) for i, t in
               enumerate(self.tokens) if i >= start and (final is None or i != final.index)]
        return out + ([final] if final is not None else [])


class PublishLog:
    """The requests a worker runs, and those it finished in the last RECENT_S seconds."""

    def __init__(self) -> None:
        self.entries: dict[str, Published] = {}

    def start(self, request: QueuedRequest) -> None:
        """A request this worker admitted (with the tokens earlier workers published)."""
        published = list(request.published_ids)
        self.entries[request.request_id] = Published(request, published,
                                                     [None] * len(published))

    def forget(self, request_id: str) -> None:
        """A request no longer this worker's (reaped and claimed elsewhere, handed back)."""
        self.entries.pop(request_id, None)

    def keep_finished(self) -> None:
        """After a failed publish: keep only the requests whose last event was recorded (the
        others stay leased, to be resumed elsewhere, their last events maybe never written)."""
        self.entries = {rid: e for rid, e in self.entries.items() if e.final is not None}

    def record(self, events: dict[str, list[ReplyEvent]]) -> None:
        """A batch Redis acknowledged: its events, per gateway."""
        now = time.monotonic()
        for batch in events.values():
            for event in batch:
                entry = self.entries.get(event.request_id)
                if entry is None:
                    continue
                if event.token_id >= 0 and event.index == len(entry.tokens):
                    entry.tokens.append(event.token_id)
                    entry.logprobs.append(event.logprob)
                if event.finish_reason:
                    entry.final, entry.finished_at = event, now
        for rid in [rid for rid, e in self.entries.items()
                    if e.final is not None and now - e.finished_at > RECENT_S]:
            del self.entries[rid]
