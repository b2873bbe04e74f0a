"""The client side of a fault run: greedy requests that resume their stream at the other
gateway when one breaks, and a tally of what arrived against a calm run's completions.

Used by `npuserve chaos`, `npuserve bench redis` and the Sentinel failover test. It talks to
gateways over the generated stubs only (the gateway's own client is a layer above workers).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    """One request as the client saw it."""

    request_id: str
    prompt: int
    tokens: dict[int, int] = field(default_factory=dict)
    duplicated: int = 0
    arrivals: list[float] = field(default_factory=list)
    resumes: int = 0
    finish: str = ""
    error: str = ""
    refusals: list[str] = field(default_factory=list)
    """What each broken or refused call said (gateway, code, details), for the report."""

    def stall(self) -> float:
        return max((b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)),
                   default=0.0)


class Client:
    """The few calls the run makes, over the generated stubs (the gateway's own client is a
    layer above this one)."""

    def __init__(self, target: str, timeout: float = 120.0) -> None:
        import grpc

        from protos import npuserve_pb2_grpc

        self.timeout = timeout
        """Deadline of each Generate and Resume call, in seconds."""
        self.channel = grpc.insecure_channel(target)
        self.stub = npuserve_pb2_grpc.GenerationStub(self.channel)

    def generate(self, prompt: list[int], **fields: Any) -> Any:
        from protos import npuserve_pb2 as pb

        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), **fields)
        return self.stub.Generate(request, timeout=self.timeout)

    def resume(self, request_id: str, next_index: int) -> Any:
        from protos import npuserve_pb2 as pb

        return self.stub.Resume(pb.ResumeRequest(request_id=request_id, next_index=next_index),
                                timeout=self.timeout)

    def list_models(self, timeout: float) -> Any:
        from protos import npuserve_pb2 as pb

        return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def stream(client: Any, outcome: Outcome, messages: Any) -> None:
    for message in messages:
        now = time.monotonic()
        for k, token in enumerate(message.token_ids):
            index = message.index + k
            if index in outcome.tokens:
                outcome.duplicated += 1
            outcome.tokens[index] = token
            outcome.arrivals.append(now)
        if message.finish_reason:
            outcome.finish = str(message.finish_reason)


def run_one(clients: list[Any], outcome: Outcome, prompt: list[int], first: int,
            max_tokens: int, deadline: float, model: str) -> None:
    """One greedy request to its end through `clients` (two: the gateways, or one twice),
    resuming at the other when its stream breaks, sending it again when it never got in."""
    import grpc

    from protos import npuserve_pb2 as pb

    g, sent = first, False
    while time.monotonic() < deadline:
        client = clients[g]
        try:
            call = "Generate" if not sent else "Resume"
            if not sent:
                sent = True
                stream(client, outcome, client.generate(
                    prompt, model=model, max_tokens=max_tokens, ignore_eos=True,
                    sampling=pb.SamplingParameters(temperature=0),
                    request_id=outcome.request_id))
            else:
                outcome.resumes += 1
                stream(client, outcome, client.resume(outcome.request_id, len(outcome.tokens)))
            return
        except grpc.RpcError as exc:
            code = exc.code()
            outcome.refusals.append(f"{time.strftime('%H:%M:%S')} gateway{g} {call} after "
                                    f"{len(outcome.tokens)} tokens: {code.name}: "
                                    f"{exc.details()}")
            if code == grpc.StatusCode.NOT_FOUND and not outcome.tokens:
                sent = False  # it never reached Redis (or no worker serves the model yet):
                time.sleep(0.2)  # send it again, to this gateway
                continue
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ALREADY_EXISTS,
                            grpc.StatusCode.NOT_FOUND):
                outcome.error = f"{code.name}: {exc.details()}"
                return
            g = 1 - g
            time.sleep(0.5)
    last = f"; the last refusal: {outcome.refusals[-1]}" if outcome.refusals else ""
    outcome.error = f"gave up: no gateway served it in time ({outcome.resumes} resumes{last})"


def tally(outcomes: list[Outcome], reference: list[list[int]]) -> dict[str, Any]:
    """Tokens expected, received, lost, duplicated and mismatched against the calm run's
    completions (`reference`, by prompt), errors, resumes and the streams' stalls."""
    lost = duplicated = mismatched = expected = received = 0
    stalls = []
    for o in outcomes:
        ref = reference[o.prompt]
        expected += len(ref)
        received += len(o.tokens)
        duplicated += o.duplicated
        lost += sum(1 for i in range(len(ref)) if i not in o.tokens)
        mismatched += sum(1 for i, t in o.tokens.items() if i >= len(ref) or ref[i] != t)
        stalls.append(o.stall())
    stalls.sort()
    p99 = stalls[min(len(stalls) - 1, int(0.99 * len(stalls)))] if stalls else 0.0
    return {
        "requests": len(outcomes), "tokens_expected": expected,
        "tokens_received": received, "lost": lost, "duplicated": duplicated,
        "mismatched": mismatched, "errors": sum(1 for o in outcomes if o.error),
        "resumes": sum(o.resumes for o in outcomes),
        "longest_stall_s": stalls[-1] if stalls else 0.0, "stall_p99_s": p99,
    }
