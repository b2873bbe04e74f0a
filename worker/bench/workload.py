"""The seeded benchmark workload: random-token prompts with fixed, spread-out output lengths.

Every phase of `npuserve bench engine` runs exactly this list of requests, so the three
throughputs are comparable. Prompts are random token ids that avoid every special or added
token, and outputs are greedy with EOS ignored, so each request produces exactly its
`max_new_tokens` whatever the model predicts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

PROMPT_LEN_RANGE = (32, 512)
"""Inclusive range of prompt lengths, in tokens."""
OUTPUT_LEN_RANGE = (16, 256)
"""Inclusive range of requested output lengths, in tokens."""


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of the workload."""

    prompt_ids: list[int]
    max_new_tokens: int


@dataclass(frozen=True, slots=True)
class Workload:
    """The requests in arrival order, and the seed that produced them."""

    requests: list[BenchRequest]
    seed: int

    @property
    def total_prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)

    @property
    def total_output_tokens(self) -> int:
        return sum(r.max_new_tokens for r in self.requests)

    def spread(self, count: int | None) -> list[int]:
        """Indices of about `count` requests spread evenly over the workload (every k-th; None:
        all): what a one-at-a-time baseline runs, since a request alone shares nothing with
        the others and a spread subset measures the same rate."""
        n = len(self.requests)
        return list(range(0, n, max(1, n // (count or n))))

    def subset(self, indices: list[int]) -> Workload:
        return Workload([self.requests[i] for i in indices], self.seed)


@dataclass(frozen=True, slots=True)
class PhaseResult:
    """The workload run one way: wall time and each request's own output tokens."""

    name: str
    wall_s: float
    output_tokens: int
    """Requested output tokens, the useful work (the same for every phase)."""
    computed_tokens: int
    """Output positions actually computed; a static batch computes past short requests."""
    outputs: list[list[int]]
    """Each request's output ids, in workload order, truncated to what it asked for."""

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


def _spread(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    """n lengths in [lo, hi], one drawn from each of n equal strata, in shuffled order.

    Stratifying guarantees a spread even for a handful of requests, where independent uniform
    draws could easily cluster at one end.
    """
    width = (hi - lo + 1) / n
    lengths = [lo + int(i * width + rng.random() * width) for i in range(n)]
    lengths = [min(max(x, lo), hi) for x in lengths]
    rng.shuffle(lengths)
    return lengths


def make_workload(
    num_requests: int,
    vocab_size: int,
    excluded_ids: set[int],
    *,
    seed: int = 0,
    prompt_len_range: tuple[int, int] = PROMPT_LEN_RANGE,
    output_len_range: tuple[int, int] = OUTPUT_LEN_RANGE,
) -> Workload:
    """Build the workload; the same arguments always give the same requests."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    allowed = _allowed(vocab_size, excluded_ids)
    rng = random.Random(seed)
    prompt_lens = _spread(rng, num_requests, *prompt_len_range)
    output_lens = _spread(rng, num_requests, *output_len_range)
    requests = [
        BenchRequest(prompt_ids=rng.choices(allowed, k=p), max_new_tokens=o)
        for p, o in zip(prompt_lens, output_lens, strict=True)
    ]
    return Workload(requests=requests, seed=seed)


def make_shared_prefix_workload(
    num_requests: int,
    vocab_size: int,
    excluded_ids: set[int],
    *,
    prefix_len: int,
    own_len: int,
    output_len: int,
    seed: int = 0,
) -> Workload:
    """Requests whose prompts are one shared prefix (a system prompt) of prefix_len random
    tokens and own_len tokens of their own, each asking output_len tokens."""
    if num_requests < 1 or prefix_len < 0 or own_len < 1 or output_len < 1:
        raise ValueError("need >= 1 request, >= 0 prefix tokens, >= 1 own and output token")
    allowed = _allowed(vocab_size, excluded_ids)
    rng = random.Random(seed)
    prefix = rng.choices(allowed, k=prefix_len)
    requests = [BenchRequest(prefix + rng.choices(allowed, k=own_len), output_len)
                for _ in range(num_requests)]
    return Workload(requests=requests, seed=seed)


def _allowed(vocab_size: int, excluded_ids: set[int]) -> list[int]:
    allowed = [i for i in range(vocab_size) if i not in excluded_ids]
    if not allowed:
        raise ValueError("every token id of the vocabulary is excluded")
    return allowed


def _ids(value: object) -> set[int]:
    """Token ids from a config field that may be absent, one int, or a list of ints."""
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def _read_json(path: Path) -> dict[str, object]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


_SPECIAL_ID_KEYS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",
    "decoder_start_token_id",
)


def special_token_ids(model_dir: str | Path) -> set[int]:
    """Every special or added token id a prompt must avoid, read from the checkpoint's JSON.

    Looks at bos/eos/pad/unk/decoder-start ids in config.json and generation_config.json, the
    `added_tokens` of tokenizer.json and the `added_tokens_decoder` of tokenizer_config.json.
    Plain JSON parsing keeps this free of transformers and works without any tokenizer file.
    """
    root = Path(model_dir)
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        cfg = _read_json(root / name)
        text_cfg = cfg.get("text_config")
        for source in (cfg, text_cfg if isinstance(text_cfg, dict) else {}):
            for key in _SPECIAL_ID_KEYS:
                ids |= _ids(source.get(key))
    added = _read_json(root / "tokenizer.json").get("added_tokens")
    if isinstance(added, list):
        ids |= {t["id"] for t in added if isinstance(t, dict) and isinstance(t.get("id"), int)}
    decoder = _read_json(root / "tokenizer_config.json").get("added_tokens_decoder")
    if isinstance(decoder, dict):
        ids |= {int(k) for k in decoder if str(k).isdigit()}
    return ids


def regular_vocab_size(model_dir: str | Path) -> int | None:
    """One past the highest ordinary token id of tokenizer.json, or None without one.

    Checkpoints often pad the embedding matrix past the tokenizer (Qwen: 151,936 rows for
    151,665 tokens); rows past the tokenizer are never produced by real text, so prompts
    stay below this bound.
    """
    model = _read_json(Path(model_dir) / "tokenizer.json").get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict) and vocab:
        return max(int(v) for v in vocab.values()) + 1
    if isinstance(vocab, list) and vocab:  # unigram tokenizers list (piece, score) pairs
        return len(vocab)
    return None


def model_vocab_size(model_dir: str | Path) -> int:
    """`vocab_size` of config.json (or of its `text_config`): the rows of the embedding."""
    cfg = _read_json(Path(model_dir) / "config.json")
    text_cfg = cfg.get("text_config")
    for source in (cfg, text_cfg if isinstance(text_cfg, dict) else {}):
        value = source.get("vocab_size")
        if isinstance(value, int):
            return value
    raise ValueError(f"{model_dir}/config.json has no vocab_size")


def usable_vocab(model_dir: str | Path) -> tuple[int, set[int]]:
    """A checkpoint's vocabulary bound for prompts, and the special or added ids to avoid."""
    vocab = model_vocab_size(model_dir)
    regular = regular_vocab_size(model_dir)
    if regular is not None:
        vocab = min(vocab, regular)
    return vocab, special_token_ids(model_dir)


def workload_for_model(model_dir: str | Path, num_requests: int, *, seed: int = 0) -> Workload:
    """The workload for a checkpoint: its usable vocabulary minus special and added tokens."""
    vocab, excluded = usable_vocab(model_dir)
    return make_workload(num_requests, vocab, excluded, seed=seed)
