"""Which sampling parameters a backend honours, and the error that refuses the others."""

from __future__ import annotations

import pytest

from common.capabilities import (
    FIELD_BITS,
    SAMPLING_FIELDS,
    Capabilities,
    field_mask,
    requested,
    unsupported,
)
from common.errors import ErrorCode
from common.sampling_params import SamplingParams

GREEDY_ONLY = Capabilities(frozenset({"stop", "stop_token_ids", "ignore_eos"}))


def test_a_backend_honouring_everything_refuses_nothing() -> None:
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, seed=3,
                            repetition_penalty=1.2, presence_penalty=0.5, logprobs=True)
    assert unsupported(params, Capabilities()) is None


def test_fields_left_at_their_neutral_values_ask_nothing() -> None:
    assert requested(SamplingParams(max_tokens=99, temperature=0.0)) == []
    assert unsupported(SamplingParams(max_tokens=99, temperature=0.0), GREEDY_ONLY) is None


@pytest.mark.parametrize(("params", "field"), [
    (SamplingParams(), "temperature"),  # the default samples at temperature 1
    (SamplingParams(temperature=0.0, logprobs=True), "logprobs"),
    (SamplingParams(temperature=0.0, repetition_penalty=1.1), "repetition_penalty"),
    (SamplingParams(temperature=0.0, top_p=0.5, seed=1), "top_p"),
])
def test_the_first_field_the_backend_cannot_honour_is_named(params: SamplingParams,
                                                            field: str) -> None:
    error = unsupported(params, GREEDY_ONLY)
    assert error is not None and error.field == field
    assert error.code == ErrorCode.INVALID_ARGUMENT
    assert "not supported by this model's backend" in str(error)


def test_capabilities_round_trip_through_flat_string_fields() -> None:
    for caps in (Capabilities(), GREEDY_ONLY, Capabilities(frozenset())):
        fields = caps.to_fields()
        assert all(isinstance(v, str) for v in fields.values())
        assert Capabilities.from_fields(fields) == caps
    assert Capabilities.from_fields({}).sampling == SAMPLING_FIELDS


def test_a_requests_needs_meet_exactly_the_bits_a_backend_lacks() -> None:
    needs = field_mask(requested(SamplingParams(temperature=0.0, logprobs=True, stop=("x",))))
    assert needs == FIELD_BITS["logprobs"], "stop strings are the gateway's: no bit"
    assert needs & GREEDY_ONLY.lacking
    assert not needs & Capabilities().lacking
