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
        """A zeroed bfloat16 buffer that lives as long as the session (KV slots)."""
        ...

    def zero(self, buffer: Any) -> None:
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

    def zero(self, buffer: np.ndarray) -> None:
        buffer.fill(0)

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


class BmodelSession:
    """One KV slot of a loaded bmodel: prefill a prompt, then decode a token at a time."""

    def __init__(self, runtime: Runtime, manifest: Mapping[str, Any]) -> None:
        self.runtime = runtime
        self.seqlen = int(manifest["seqlen"])
        self.num_layers = int(manifest["num_layers"])
        nets = manifest["nets"]
        history = {t["name"]: t["shape"] for t in nets["block_cache_0"]["inputs"]}
        kv_shape = tuple(history["history_k"])  # [1, SEQLEN, KVH, D]
        self._row = math.prod(kv_shape[2:])
        """Elements of one position's key (or value) in one layer."""
        self._hidden = int(nets["embedding"]["outputs"][0]["shape"][-1])
        self._keys = [runtime.buffer(kv_shape) for _ in range(self.num_layers)]
        self._values = [runtime.buffer(kv_shape) for _ in range(self.num_layers)]
        self._last_hidden = runtime.buffer((1, self._hidden))
        self.kv_bytes = 2 * self.num_layers * math.prod(kv_shape) * 2
        """Memory this slot's keys and values hold (bfloat16)."""
        self.length = 0
        """Tokens whose keys and values are in the slot."""

    def reset(self) -> None:
        """Forget the sequence (after a failed device call): the next use is a prefill."""
        self.length = 0

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Start the slot over with `tokens`; returns lm_head's output for the last one."""
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
        self.length = 0
        rt = self.runtime
        hidden = rt.run("embedding", {"input_ids": ids})["embedding"]
        for i in range(self.num_layers):
            out = rt.run(f"block_{i}", {
                "input_states": hidden, "position_ids": positions,
                "attention_mask": mask.reshape(1, 1, self.seqlen, self.seqlen)})
            hidden = out["output_states"]
            for cache, name in ((self._keys[i], "k_cache"), (self._values[i], "v_cache")):
                rt.zero(cache)
                rt.copy(cache, out[name], 0, 0, n * self._row)
        rt.copy(self._last_hidden, hidden, 0, (n - 1) * self._hidden, self._hidden)
        self.length = n
        return self._head(self._last_hidden)

    def decode(self, token: int) -> np.ndarray:
        """Feed one token at the next position; returns lm_head's output for it."""
        p = self.length
        if p == 0 or p >= self.seqlen:
            raise InvalidRequestError(
                "max_tokens", f"the sequence reached this bmodel's SEQLEN of {self.seqlen}")
        position = np.array([[p]], np.int32)
        mask = np.zeros((1, 1, 1, self.seqlen + 1), np.uint16)
        mask[..., p:self.seqlen] = MASKED
        rt = self.runtime
        self.length = 0  # until every layer has its row: a failed call leaves no half-step
        hidden = rt.run("embedding_cache",
                        {"input_ids": np.array([[token]], np.int32)})["embedding_cache"]
        for i in range(self.num_layers):
            out = rt.run(f"block_cache_{i}", {
                "input_states": hidden, "position_ids": position, "attention_mask": mask,
                "history_k": self._keys[i], "history_v": self._values[i]})
            hidden = out["output_states"]
            rt.copy(self._keys[i], out["k_cache"], p * self._row, 0, self._row)
            rt.copy(self._values[i], out["v_cache"], p * self._row, 0, self._row)
        self.length = p + 1
        return self._head(hidden)

    def _head(self, hidden: Any) -> np.ndarray:
        """lm_head over one hidden state [1, H] -> its output row: float32 logits (bfloat16
        ones widened), or the chip's top-1 id."""
        out = self.runtime.run("lm_head", {"hidden_states": hidden})
        row = self.runtime.to_host(next(iter(out.values())))
        return (bf16_to_f32(row) if row.dtype == np.uint16 else row).reshape(-1)
