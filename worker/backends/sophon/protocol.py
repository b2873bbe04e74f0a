"""The net-level protocol of an llm_convert bmodel, written once for every runtime.

A runtime is anything with `run(net, inputs) -> outputs` (arrays by tensor name, bfloat16 as
uint16 bits): the simulator process here, `sophon.sail` on a card. The protocol is the one
Sophgo's own demos (LLM-TPU's chat.cpp) drive:

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

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from common.errors import InvalidRequestError

MASKED = np.uint16(0xC61C)
"""bfloat16 -9984: the vendor's attention-mask value for positions a token may not see."""


class Runtime(Protocol):
    def run(self, net: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Call one net: inputs by name -> outputs by name (bfloat16 as uint16)."""
        ...


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
        self._kv_shape = tuple(history["history_k"])  # [1, SEQLEN, KVH, D]
        self._hidden = int(nets["embedding"]["outputs"][0]["shape"][-1])
        self._keys = [np.zeros(self._kv_shape, np.uint16) for _ in range(self.num_layers)]
        self._values = [np.zeros(self._kv_shape, np.uint16) for _ in range(self.num_layers)]
        self.length = 0
        """Tokens whose keys and values are in the slot."""

    @property
    def kv_bytes(self) -> int:
        """Host memory this slot's keys and values hold."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self._keys, self._values, strict=True))

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
        hidden = self.runtime.run("embedding", {"input_ids": ids})["embedding"]
        for i in range(self.num_layers):
            out = self.runtime.run(f"block_{i}", {
                "input_states": hidden, "position_ids": positions,
                "attention_mask": mask.reshape(1, 1, self.seqlen, self.seqlen)})
            hidden = out["output_states"]
            self._keys[i].fill(0)
            self._values[i].fill(0)
            self._keys[i][:, :n] = out["k_cache"].reshape(self._kv_shape)[:, :n]
            self._values[i][:, :n] = out["v_cache"].reshape(self._kv_shape)[:, :n]
        self.length = n
        last = hidden.reshape(1, self.seqlen, self._hidden)[:, n - 1]
        return self._head(last)

    def decode(self, token: int) -> np.ndarray:
        """Feed one token at the next position; returns lm_head's output for it."""
        p = self.length
        if p == 0 or p >= self.seqlen:
            raise InvalidRequestError(
                "max_tokens", f"the sequence reached this bmodel's SEQLEN of {self.seqlen}")
        position = np.array([[p]], np.int32)
        mask = np.zeros((1, 1, 1, self.seqlen + 1), np.uint16)
        mask[..., p:self.seqlen] = MASKED
        hidden = self.runtime.run("embedding_cache",
                                  {"input_ids": np.array([[token]], np.int32)})["embedding_cache"]
        for i in range(self.num_layers):
            out = self.runtime.run(f"block_cache_{i}", {
                "input_states": hidden, "position_ids": position, "attention_mask": mask,
                "history_k": self._keys[i], "history_v": self._values[i]})
            hidden = out["output_states"]
            self._keys[i][:, p] = out["k_cache"].reshape(self._kv_shape[2:])
            self._values[i][:, p] = out["v_cache"].reshape(self._kv_shape[2:])
        self.length = p + 1
        return self._head(hidden.reshape(1, self._hidden))

    def _head(self, hidden: np.ndarray) -> np.ndarray:
        """lm_head over one hidden state [1, H] -> its output row: float32 logits (bfloat16
        ones widened), or the chip's top-1 id."""
        row = next(iter(self.runtime.run("lm_head", {"hidden_states": hidden}).values()))
        return (bf16_to_f32(row) if row.dtype == np.uint16 else row).reshape(-1)
