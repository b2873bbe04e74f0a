"""The net-level protocol of an llm_convert bmodel, written once for every runtime.

A runtime runs one net at a time and owns the memory the protocol moves between nets: on a
card (`card.SailRuntime`, sophon.sail) the hidden states and the KV slots stay in device
memory and only ids, masks, positions and lm_head's output cross to the host; on the
simulator (`simulator.SimulatorRuntime`) and in tests (`HostRuntime`) they are numpy arrays.
The protocol is the one Sophgo's own demos (LLM-TPU's chat.cpp) drive:

- prefill: the prompt, padded to SEQLEN, through `embedding` and each `block_i` with
  positions 0..n-1 and a causal mask; each block returns the keys and values of every
  position, of which the first n become the slot's history; `lm_head` reads the hidden state
  of position n-1;
- decode: one token through `embedding_cache` and each `block_cache_i` at position p = the
  tokens so far, with the history and a mask of SEQLEN + 1 entries (the history's first p
  rows visible, the rest masked, the last entry the token itself); the block returns the
  token's key and value, written at row p.

Masked entries hold bfloat16 -9984 (0xC61C), as the vendor's demos do. A session is one KV
slot: one sequence of at most SEQLEN tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from common.errors import InvalidRequestError
from worker.backends.base import DeviceStats

MASKED = np.uint16(0xC61C)
"""bfloat16 -9984: the vendor's attention-mask value for positions a token may not see."""


class Runtime(Protocol):
    """One loaded bmodel. Values are the runtime's own (device tensors on a card, numpy
    arrays elsewhere); numpy arrays are always accepted as inputs."""

    def run(self, net: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Call one net: inputs by name -> outputs by name (bfloat16 as uint16 bits). An
        output stays valid until the next call of a net of the same kind."""
        ...

    def buffer(self, shape: Sequence[int]) -> Any:
        """A zeroed bfloat16 buffer that lives as long as its slots (KV, staging rows)."""
        ...

    def copy(self, dst: Any, src: Any, dst_offset: int, src_offset: int, count: int) -> None:
        """Copy `count` elements of src, from src_offset, into dst at dst_offset."""
        ...

    def to_host(self, value: Any) -> np.ndarray:
        ...

    def device_stats(self) -> DeviceStats | None:
        """The device's memory and utilisation, where a driver reports them."""
        ...

    def close(self) -> None:
        ...


class HostRuntime:
    """The buffer half of a runtime whose values are numpy arrays."""

    def buffer(self, shape: Sequence[int]) -> np.ndarray:
        return np.zeros(tuple(shape), np.uint16)

    def copy(self, dst: np.ndarray, src: np.ndarray, dst_offset: int, src_offset: int,
             count: int) -> None:
        dst.reshape(-1)[dst_offset:dst_offset + count] = (
            np.asarray(src).reshape(-1)[src_offset:src_offset + count])

    def to_host(self, value: np.ndarray) -> np.ndarray:
        return np.asarray(value)

    def device_stats(self) -> DeviceStats | None:
        return None

    def close(self) -> None:
        """Nothing to release by default."""


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class SlotGroup:
    """The KV slots one decode call steps together: B of them, B being the batch the bmodel's
    decode nets were compiled for (1 as Sophgo's demos compile them, or `--decode-batch`).
    Each slot holds one sequence of at most SEQLEN tokens; a prompt is prefilled into one
    slot (batch-1 nets), and any subset of the slots decodes a token each in one call per
    layer. The slots' keys and values share one [B, SEQLEN, KVH, D] buffer per layer."""

    def __init__(self, runtime: Runtime, manifest: Mapping[str, Any]) -> None:
        self.runtime = runtime
        self.seqlen = int(manifest["seqlen"])
        self.num_layers = int(manifest["num_layers"])
        nets = manifest["nets"]
        history = {t["name"]: t["shape"] for t in nets["block_cache_0"]["inputs"]}
        kv_shape = tuple(history["history_k"])  # [B, SEQLEN, KVH, D]
        self.batch = int(kv_shape[0])
        self._row = math.prod(kv_shape[2:])
        """Elements of one position's key (or value) in one layer."""
        self._slot = self.seqlen * self._row
        """Elements of one slot's keys (or values) in one layer."""
        self._hidden = int(nets["embedding"]["outputs"][0]["shape"][-1])
        self._keys = [runtime.buffer(kv_shape) for _ in range(self.num_layers)]
        self._values = [runtime.buffer(kv_shape) for _ in range(self.num_layers)]
        self._step_input = runtime.buffer((self.batch, 1, self._hidden))
        self._last_hidden = runtime.buffer((1, self._hidden))
        self.kv_bytes = 2 * self.num_layers * math.prod(kv_shape) * 2
        """Memory the slots' keys and values hold (bfloat16)."""
        self.lengths = [0] * self.batch
        """Tokens whose keys and values are in each slot."""

    def reset(self, slot: int) -> None:
        """Forget a slot's sequence (after a failed device call): its next use is a prefill."""
        self.lengths[slot] = 0

    def prefill(self, slot: int, tokens: Sequence[int]) -> np.ndarray:
        """Start `slot` over with `tokens`; returns lm_head's output for the last one. Rows
        past the prompt keep whatever they held: every mask hides them."""
        n = len(tokens)
        if not 0 < n < self.seqlen:
            raise InvalidRequestError(
                "prompt", f"has {n} tokens; this bmodel's SEQLEN is {self.seqlen}, which must "
                "also hold the generated tokens")
        ids = np.zeros((1, self.seqlen), np.int32)
        ids[0, :n] = tokens
        positions = np.zeros((1, self.seqlen), np.int32)
        positions[0, :n] = np.arange(n)
        mask = np.full((self.seqlen, self.seqlen), MASKED, np.uint16)
        causal = np.tril(np.ones((n, n), bool))
        mask[:n, :n][causal] = 0
        self.lengths[slot] = 0
        rt = self.runtime
        hidden = rt.run("embedding", {"input_ids": ids})["embedding"]
        for i in range(self.num_layers):
            out = rt.run(f"block_{i}", {
                "input_states": hidden, "position_ids": positions,
                "attention_mask": mask.reshape(1, 1, self.seqlen, self.seqlen)})
            hidden = out["output_states"]
            rt.copy(self._keys[i], out["k_cache"], slot * self._slot, 0, n * self._row)
            rt.copy(self._values[i], out["v_cache"], slot * self._slot, 0, n * self._row)
        rt.copy(self._last_hidden, hidden, 0, (n - 1) * self._hidden, self._hidden)
        self.lengths[slot] = n
        return self._head(self._last_hidden)

    def decode(self, tokens: Mapping[int, int]) -> dict[int, np.ndarray]:
        """Feed each slot in `tokens` its token at its next position, all in one call per
        layer; returns lm_head's output per slot. Slots not in `tokens` are left as they
        are (their rows of the call are masked and dropped)."""
        at = {}
        for slot in tokens:
            p = self.lengths[slot]
            if p == 0 or p >= self.seqlen:
                raise InvalidRequestError(
                    "max_tokens", f"the sequence reached this bmodel's SEQLEN of {self.seqlen}")
            at[slot] = p
        rt, width = self.runtime, self._hidden
        positions = np.zeros((self.batch, 1), np.int32)
        mask = np.full((self.batch, 1, 1, self.seqlen + 1), MASKED, np.uint16)
        mask[..., self.seqlen] = 0  # each token sees itself
        for slot, token in tokens.items():
            positions[slot, 0] = at[slot]
            mask[slot, ..., :at[slot]] = 0
            embedded = rt.run("embedding_cache",
                              {"input_ids": np.array([[token]], np.int32)})["embedding_cache"]
            rt.copy(self._step_input, embedded, slot * width, 0, width)
            self.lengths[slot] = 0  # until every layer has its row: no half-written step
        hidden = self._step_input
        for i in range(self.num_layers):
            out = rt.run(f"block_cache_{i}", {
                "input_states": hidden, "position_ids": positions, "attention_mask": mask,
                "history_k": self._keys[i], "history_v": self._values[i]})
            hidden = out["output_states"]
            for slot, p in at.items():
                row = slot * self._slot + p * self._row
                rt.copy(self._keys[i], out["k_cache"], row, slot * self._row, self._row)
                rt.copy(self._values[i], out["v_cache"], row, slot * self._row, self._row)
        results = {}
        for slot, p in at.items():
            rt.copy(self._last_hidden, hidden, 0, slot * width, width)
            results[slot] = self._head(self._last_hidden)
            self.lengths[slot] = p + 1
        return results

    def _head(self, hidden: Any) -> np.ndarray:
        """lm_head over one hidden state [1, H] -> its output row: float32 logits (bfloat16
        ones widened), or the chip's top-1 id."""
        out = self.runtime.run("lm_head", {"hidden_states": hidden})
        row = self.runtime.to_host(next(iter(out.values())))
        return (bf16_to_f32(row) if row.dtype == np.uint16 else row).reshape(-1)


class BmodelSession:
    """One sequence on a loaded bmodel (slot 0 of a group of its own): what a tool that runs
    one text at a time uses (verify, the tests' references)."""

    def __init__(self, runtime: Runtime, manifest: Mapping[str, Any]) -> None:
        self.group = SlotGroup(runtime, manifest)

    @property
    def length(self) -> int:
        return self.group.lengths[0]

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        return self.group.prefill(0, tokens)

    def decode(self, token: int) -> np.ndarray:
        return self.group.decode({0: token})[0]
