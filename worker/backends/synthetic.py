"""The synthetic backend: no model, no device, a fixed step time and deterministic tokens.

Every `execute` sleeps `synthetic_step_ms`, whatever the batch, and returns one token id per
sampled chunk, a function of the chunk's last token and the new token's position only, so a
sequence gets the same tokens in any batch and after a resume. It runs under the real engine,
scheduler and worker, so `npuserve worker --backend synthetic --model DIR` serves through the
real gateway and Redis: a load test against it measures that path alone (the gateway still
tokenizes and detokenizes with DIR's tokenizer; the weights are never read).

It samples nothing, so like an on-chip-sampling device it honours greedy decoding only
(temperature 0); requests asking for more are refused at admission, never served as if.
No torch here; the KV cache is bookkeeping only (`synthetic_kv_tokens` of it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from common.capabilities import Capabilities
from common.config import EngineConfig
from worker.backends.base import Backend, BackendCapacity, OutputKind, SequenceChunk, StepResult
from worker.backends.synthetic_settings import FIRST_ID, SyntheticSettings
from worker.model.config import ModelConfig

log = logging.getLogger(__name__)

BLOCK_SIZE = 16
"""Tokens per (bookkeeping-only) KV block, as the torch backend's default."""
GREEDY_ONLY = Capabilities(frozenset({"stop_token_ids", "ignore_eos"}))


class SyntheticBackend(Backend):
    name = "synthetic"
    capabilities = GREEDY_ONLY
    device = "synthetic"

    def __init__(self, model_dir: str | Path, engine: EngineConfig | None = None,
                 settings: SyntheticSettings | None = None) -> None:
        engine = engine or EngineConfig()
        self.settings = settings = settings or SyntheticSettings()
        self.model_config = ModelConfig.from_dir(model_dir)
        cfg = self.model_config
        max_seq_len = min(engine.max_model_len or cfg.max_position_embeddings,
                          cfg.max_position_embeddings)
        self._vocab = max(1, min(settings.synthetic_vocab, cfg.vocab_size - FIRST_ID))
        self._eos = frozenset(cfg.eos_token_ids)
        self._step_s = settings.synthetic_step_ms / 1e3
        self.capacity = BackendCapacity(
            max_batch=engine.max_num_seqs,
            max_seq_len=max_seq_len,
            max_tokens_per_step=engine.max_num_batched_tokens,
            block_size=BLOCK_SIZE,
            # bookkeeping only, but every block is an object the engine's garbage collections
            # walk: as many as the setting asks, not max_num_seqs full contexts' worth
            num_blocks=max(-(-settings.synthetic_kv_tokens // BLOCK_SIZE),
                           -(-max_seq_len // BLOCK_SIZE)),
            output=OutputKind.TOKENS,
            prefix_caching=engine.enable_prefix_caching,
        )
        log.warning("SYNTHETIC backend for %s: no model runs; every step sleeps %.1f ms and "
                    "returns deterministic tokens (ids %d-%d), greedy requests only. It "
                    "measures the gateway and Redis path, not a model", model_dir,
                    settings.synthetic_step_ms, FIRST_ID, FIRST_ID + self._vocab - 1)

    def next_token(self, last: int, position: int) -> int:
        """The token at `position` after `last`: the same for a sequence in any batch."""
        token = FIRST_ID + (last * 1_000_003 + position * 7_919) % self._vocab
        for _ in range(self._vocab):  # an EOS would end streams that do not ignore it
            if token not in self._eos:
                break
            token = FIRST_ID + (token - FIRST_ID + 1) % self._vocab
        return token

    def execute(self, chunks: Sequence[SequenceChunk]) -> StepResult:
        deadline = time.perf_counter() + self._step_s
        tokens = [self.next_token(c.token_ids[-1], c.start_pos + len(c.token_ids))
                  for c in chunks if c.sample]
        left = deadline - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return StepResult(token_ids=tokens)

    def weight_bytes(self) -> int:
        return 0
