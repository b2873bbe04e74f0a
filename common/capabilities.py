"""Which sampling parameters a backend honours, and the check that refuses the rest.

A backend that returns logits is sampled by the engine and honours every parameter; one that
samples on its device may not (a static graph with greedy decoding only, no log-probs). A
request asking for something its backend cannot do is refused with INVALID_ARGUMENT naming
the field, never served while silently ignoring it. Workers publish their capabilities with
their registration (`to_fields`), so a gateway can refuse the same requests before queueing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.errors import InvalidRequestError
from common.sampling_params import SamplingParams

SAMPLING_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(SamplingParams))
ALWAYS_HONOURED = frozenset({"max_tokens", "stop"})
"""Fields every backend honours: the engine enforces max_tokens whatever the device does, and
stop strings are the gateway's."""
NEUTRAL = SamplingParams(temperature=0.0)
"""A field asks something of the backend when its value differs from this one's: greedy
decoding, no filtering, no penalties, no seed, no stops, no log-probs."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    sampling: frozenset[str] = SAMPLING_FIELDS
    """SamplingParams fields the backend honours when a request sets them."""

    @property
    def lacking(self) -> int:
        """The fields this backend cannot honour, as a mask of FIELD_BITS."""
        return field_mask(SAMPLING_FIELDS - ALWAYS_HONOURED - self.sampling)

    def to_fields(self) -> dict[str, str]:
        """A flat string form, for a Redis hash such as a worker's registration."""
        return {"sampling": ",".join(sorted(self.sampling))}

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Capabilities:
        """The inverse of to_fields; a registration without the field honours everything."""
        if "sampling" not in fields:
            return cls()
        return cls(frozenset(n for n in fields["sampling"].split(",") if n))


def requested(params: SamplingParams) -> list[str]:
    """The fields `params` sets away from NEUTRAL, in declaration order."""
    return [name for name in (f.name for f in dataclasses.fields(SamplingParams))
            if name not in ALWAYS_HONOURED and getattr(params, name) != getattr(NEUTRAL, name)]


FIELD_BITS: dict[str, int] = {
    name: 1 << i for i, name in enumerate(sorted(SAMPLING_FIELDS - ALWAYS_HONOURED))}
"""A bit per field a backend may lack: a queued request carries the mask of what it asks for,
and a worker's claim skips requests asking for something it cannot honour."""


def field_mask(names: Iterable[str]) -> int:
    """The FIELD_BITS of `names` ORed together (fields always honoured have no bit)."""
    return sum(FIELD_BITS.get(name, 0) for name in set(names))


def unsupported(params: SamplingParams, capabilities: Capabilities) -> InvalidRequestError | None:
    """The error naming the first field `params` sets that the backend cannot honour, or None."""
    for name in requested(params):
        if name not in capabilities.sampling:
            neutral = getattr(NEUTRAL, name)
            return InvalidRequestError(
                name, f"is not supported by this model's backend; leave it at {neutral!r}")
    return None
