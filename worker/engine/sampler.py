"""Turn a batch of logits into one token per request, each under its own SamplingParams.

A sampled row goes through, in vLLM's order: repetition penalty, presence/frequency penalties,
temperature, top-k, top-p, min-p, then a draw. A greedy row takes the argmax after the
penalties. Each stage is vectorised over the batch with per-row parameter columns; a row that
disables a feature gets that feature's identity (penalty 1, no cutoff, min_p 0).

Filters work on weights w = exp((x - max) / T), the probabilities up to a per-row factor, so
the peak weighs exactly 1 and min_p is a threshold on w itself. Ties at a cutoff are kept.

Reproducibility: a row's randomness is one uniform per step from its own generator, drawn by
inverse CDF over its kept tokens in vocabulary order; everything else is row-wise. A seeded
request therefore gets the same tokens whatever else shares the batch and wherever it sits.
(On CPU that is exact up to last-ulp differences between vectorised and scalar exp, which
could move a draw only when its uniform lands within ~1e-7 of a boundary.)
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from common.sampling_params import SamplingParams

_MIN_TEMPERATURE = 1e-5
"""Smaller temperatures are clamped so 1 / T stays finite; the draw is greedy anyway."""


@dataclass(slots=True)
class SampleRow:
    """One request's inputs to a sampling step."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    """Prompt tokens; read only when repetition_penalty != 1."""
    output_ids: Sequence[int]
    """Tokens generated so far; every penalty counts these."""
    generator: torch.Generator | None
    """The request's own generator, on the logits' device; None only for greedy rows."""


@dataclass(slots=True)
class SampleResult:
    """One chosen token per row, in row order."""

    token_ids: list[int]
    logprobs: list[float | None]
    """Log-probability of the chosen token under the raw logits; None where not asked for."""
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)
    """The row's top_logprobs most likely (token id, log-probability), most likely first;
    None where not asked for (empty: no row asked)."""


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A per-request generator: seeded from `seed`, or from fresh OS entropy when None."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


def draw(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The one uniform a sampled row consumes per step ([1])."""
    return torch.rand(1, generator=generator, device=device)


def skip_draws(generator: torch.Generator, n: int) -> None:
    """Advance `generator` past the draws of `n` sampled tokens, exactly as `n` steps would,
    so a request resumed after n tokens continues the stream an uninterrupted run would see."""
    for _ in range(n):
        draw(generator, generator.device)


class Sampler:
    """Stateless batch sampler, called once per step with that step's logits."""

    def __init__(self, *, nucleus_probe: int = 1024) -> None:
        """`nucleus_probe`: how many top tokens a top-p row without top-k examines first.

        A full sort of a 152k vocabulary costs ~12 ms a row on CPU, a top-1024 under a tenth of
        that, and a nucleus rarely reaches past it; rows whose nucleus does are then sorted in
        full, with the same result.
        """
        self.nucleus_probe = nucleus_probe

    def __call__(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> SampleResult:
        """Choose a token for each row of `logits` ([B, V] raw model output, any device)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        if all(r.params.greedy and not r.params.logprobs and not _penalised(r.params)
               for r in rows):
            # Every decode step of a greedy benchmark lands here: one kernel, one sync.
            return SampleResult(greedy_ids(logits).tolist(), [None] * len(rows))
        for i, r in enumerate(rows):
            if r.generator is None and not r.params.greedy:
                raise ValueError(f"row {i} samples (temperature > 0) but has no generator")

        x = apply_penalties(logits.float(), rows)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        tokens = torch.empty(len(rows), dtype=torch.long, device=x.device)  # [B]
        if greedy:
            tokens[_index(greedy, x.device)] = greedy_ids(_take(x, greedy))
        if sampled:
            chosen = self._sample(_take(x, sampled), [rows[i] for i in sampled])
            tokens[_index(sampled, x.device)] = chosen

        logprobs: list[float | None] = [None] * len(rows)
        top: list[list[tuple[int, float]] | None] = []
        asked = [i for i, r in enumerate(rows) if r.params.logprobs]
        if asked:
            # vLLM v1's default: the chosen token under the model's own distribution, before
            # any penalty, temperature or filter.
            raw = _take(logits.float(), asked)  # [A, V]
            norm = raw.logsumexp(dim=-1, keepdim=True)  # [A, 1]
            picked = raw.gather(1, tokens[_index(asked, x.device)].unsqueeze(1))  # [A, 1]
            for i, lp in zip(asked, (picked - norm).squeeze(1).tolist(), strict=True):
                logprobs[i] = lp
            k = max(rows[i].params.top_logprobs for i in asked)
            if k:
                values, ids = (raw - norm).topk(k, dim=-1)  # [A, k] each
                top = [None] * len(rows)
                for i, v, t in zip(asked, values.tolist(), ids.tolist(), strict=True):
                    n = rows[i].params.top_logprobs
                    top[i] = list(zip(t[:n], v[:n], strict=True)) if n else None
        return SampleResult(tokens.tolist(), logprobs, top)

    def _sample(self, x: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        """Draw one token per row of penalised logits `x` ([S, V]); returns [S] token ids."""
        vocab, device = x.shape[1], x.device
        params = [r.params for r in rows]
        # Drawn before anything else, one per row, so a row's stream never depends on the path.
        u = torch.cat([draw(r.generator, device) for r in rows])
        tokens = torch.empty(len(rows), dtype=torch.long, device=device)
        short = [i for i, p in enumerate(params) if _top_k(p, vocab)]
        full = [i for i, p in enumerate(params) if not _top_k(p, vocab)]
        if short:
            idx = _index(short, device)
            filters = _Filters.of(params, short, vocab, device)
            tokens[idx], complete = _sample_top_k(_take(x, short), filters, u[idx])
            # A tie at the k-th token that runs past the examined candidates: the full path.
            full = sorted(full + [i for i, ok in zip(short, complete.tolist(), strict=True)
                                  if not ok])
        if full:
            idx = _index(full, device)
            filters = _Filters.of(params, full, vocab, device)
            tokens[idx] = self._sample_full(_take(x, full), filters, u[idx])
        return tokens

    def _sample_full(self, x: torch.Tensor, f: _Filters, u: torch.Tensor) -> torch.Tensor:
        """Draw over the whole vocabulary ([R, V] logits, [R] uniforms); returns [R] ids."""
        vocab = x.shape[1]
        w = x - x.amax(dim=-1, keepdim=True)
        w.mul_(f.inv_temperature.unsqueeze(1)).exp_()  # [R, V], the peak weighs exactly 1
        floor = f.min_p
        if f.any_cutoff:
            # Top-p without top-k renormalises over the whole row.
            total = w.sum(dim=-1) if f.any_bare_top_p else torch.ones_like(f.min_p)
            width = min(vocab, max(self.nucleus_probe, f.max_k + 1))
            floor, complete = _floors(w.topk(width, dim=-1).values, f, total, width == vocab)
            if not bool(complete.all()):
                # Only rows whose nucleus reaches past the probe pay for a full sort.
                redo = (~complete).nonzero().squeeze(1)
                ordered = w[redo].sort(dim=-1, descending=True).values
                floor[redo], _ = _floors(ordered, f.select(redo), total[redo], True)
        if f.any_cutoff or f.any_min_p:
            w.masked_fill_(w < floor.unsqueeze(1), 0.0)
        return _inverse_cdf(w, u)


@dataclass(slots=True)
class _Filters:
    """Per-row filter parameters as [R] columns on the logits' device."""

    k: torch.Tensor  # long; 0 keeps the whole vocabulary
    top_p: torch.Tensor
    min_p: torch.Tensor
    inv_temperature: torch.Tensor
    max_k: int
    any_cutoff: bool  # some row uses top-k or top-p
    any_bare_top_p: bool  # some row uses top-p without top-k
    any_min_p: bool

    @classmethod
    def of(cls, params: Sequence[SamplingParams], rows: list[int], vocab: int,
           device: torch.device) -> _Filters:
        chosen = [params[i] for i in rows]
        ks = [_top_k(p, vocab) for p in chosen]
        return cls(
            k=_index(ks, device),
            top_p=_floats([p.top_p for p in chosen], device),
            min_p=_floats([p.min_p for p in chosen], device),
            inv_temperature=_floats([1 / max(p.temperature, _MIN_TEMPERATURE) for p in chosen],
                                    device),
            max_k=max(ks, default=0),
            any_cutoff=any(k or p.top_p < 1.0 for k, p in zip(ks, chosen, strict=True)),
            any_bare_top_p=any(not k and p.top_p < 1.0 for k, p in zip(ks, chosen, strict=True)),
            any_min_p=any(p.min_p > 0.0 for p in chosen),
        )

    def select(self, rows: torch.Tensor) -> _Filters:
        return _Filters(self.k[rows], self.top_p[rows], self.min_p[rows],
                        self.inv_temperature[rows], self.max_k, self.any_cutoff,
                        self.any_bare_top_p, self.any_min_p)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely token: argmax's choice (the first of tied maxima; a NaN wins as
    in argmax), by `max`, whose CPU reduction took a third of argmax's time over SmolLM2's
    49,152 logits (0.15 against 0.43 ms at 12 rows, 0.47 against 1.16 at 32, on a Xeon)."""
    return logits.max(dim=-1).indices


def _sample_top_k(
    x: torch.Tensor, f: _Filters, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw among the top-k candidates only ([R, V] logits); returns ids and, per row, whether
    the candidates held every kept token (else the caller redraws over the full vocabulary)."""
    vocab = x.shape[1]
    width = min(vocab, f.max_k + 1)  # one past the largest k shows whether a tie runs on
    values, ids = x.topk(width, dim=-1)  # [R, W], descending
    w = ((values - values[:, :1]) * f.inv_temperature.unsqueeze(1)).exp()  # same ops as full
    floor, complete = _floors(w, f, torch.ones_like(f.min_p), width == vocab)
    w = w.masked_fill(w < floor.unsqueeze(1), 0.0)
    # Vocabulary order, as on the full path, so the order topk gives tied candidates cannot
    # change the draw; dropped candidates sort last.
    order = torch.where(w > 0, ids, vocab).argsort(dim=-1)
    position = _inverse_cdf(w.gather(1, order), u)
    return ids.gather(1, order).gather(1, position.unsqueeze(1)).squeeze(1), complete


def _floors(
    ordered: torch.Tensor, f: _Filters, total: torch.Tensor, whole: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight below which each row drops tokens, from its top-W weights in descending
    order ([R, W]; `whole` when W is the vocabulary), and whether W sufficed to find it.

    `total` is the full row's weight, used by rows with top-p but no top-k.
    """
    width = ordered.shape[1]
    has_k = f.k > 0
    last_k = (torch.where(has_k, f.k, width) - 1).unsqueeze(1)  # [R, 1]
    cut_k = torch.where(has_k, ordered.gather(1, last_k).squeeze(1), 0.0)
    kept_mass = ordered.masked_fill(ordered < cut_k.unsqueeze(1), 0.0).cumsum(dim=-1)  # [R, W]
    # Top-p after top-k renormalises over the top-k set.
    mass = torch.where(has_k, kept_mass[:, -1], total)
    before = (kept_mass < (f.top_p * mass).unsqueeze(1)).sum(dim=-1)  # tokens before crossing
    nucleus = ordered.gather(1, before.clamp(max=width - 1).unsqueeze(1)).squeeze(1)
    uses_p = f.top_p < 1.0
    floor = torch.maximum(torch.maximum(cut_k, torch.where(uses_p, nucleus, 0.0)), f.min_p)
    # The top-k set, ties included, must end inside W; the nucleus must be reached inside W.
    complete = (~has_k | (ordered[:, -1] < cut_k)) & (~uses_p | (before < width))
    return floor, complete | whole


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn in proportion to `weights` ([R, N], some positive; overwritten with their
    running sum) with uniforms u ([R]).

    One uniform per row instead of the exponential race's N, which on CPU is the difference
    between ~0.05 ms and ~3 ms a row at N = 152k.
    """
    cdf = weights.cumsum_(dim=-1)  # [R, N]; in place spares a fresh 20 MB at B = 32
    total = cdf[:, -1:]
    target = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, total.new_zeros(())))
    # right=True: the first cdf above the target, never a zero-weight token (its cdf repeats
    # its predecessor's).
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Repetition, then presence/frequency penalties, per row; `logits` is left unchanged.

    Repetition (HF/CTRL) divides positive and multiplies negative logits of every token seen in
    the prompt or the output; presence/frequency (OpenAI) subtract presence * (count > 0) +
    frequency * count over output tokens only. Returns `logits` itself when no row penalises.
    """
    hit = [i for i, r in enumerate(rows) if _penalised(r.params)]
    if not hit:
        return logits
    vocab, device = logits.shape[1], logits.device
    params = [r.params for r in rows]  # rows without penalties carry the identity values
    prompts = [r.prompt_ids if r.params.repetition_penalty != 1.0 else () for r in rows]
    outputs = [r.output_ids if _penalised(r.params) else () for r in rows]
    # Only seen tokens change, so gather them ([B, L]), penalise and scatter back rather than
    # rewrite [B, V]; a repeated id computes and writes the same value each time.
    seen, any_seen = _seen_ids(prompts, outputs, device)
    x = logits.clone(memory_format=torch.contiguous_format)
    before = x.gather(1, seen)  # [B, L]
    after = before
    if any(p.repetition_penalty != 1.0 for p in params):
        penalty = _floats([p.repetition_penalty for p in params], device).unsqueeze(1)
        after = torch.where(after > 0, after / penalty, after * penalty)
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        idx = _index(hit, device)
        counts = _histogram([outputs[i] for i in hit], vocab, device)  # [P, V]
        count = torch.zeros_like(before).index_copy_(0, idx, counts.gather(1, seen[idx]))
        presence = _floats([p.presence_penalty for p in params], device).unsqueeze(1)
        frequency = _floats([p.frequency_penalty for p in params], device).unsqueeze(1)
        after = after - frequency * count - presence * (count > 0)
    return x.scatter_(1, seen, torch.where(any_seen, after, before))


def _seen_ids(
    prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt then output ids per row ([R, L]), padded with the row's first id (a harmless
    repeat), and whether the row has any ([R, 1]; an empty row is all 0s, left unchanged)."""
    width = max((len(p) + len(o) for p, o in zip(prompts, outputs, strict=True)), default=0)
    ids = torch.full((len(prompts), max(width, 1)), -1, dtype=torch.long)
    for i, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        if len(p):
            ids[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        if len(o):
            ids[i, len(p) : len(p) + len(o)] = torch.as_tensor(o, dtype=torch.long)
    first = ids[:, :1]
    ids = torch.where(ids < 0, first.clamp(min=0), ids)
    return ids.to(device), (first >= 0).to(device)


def _histogram(ids: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Token counts per row ([R, vocab] float32), by scatter_add over padded ids."""
    width = max((len(s) for s in ids), default=0)
    padded = torch.full((len(ids), width), vocab, dtype=torch.long)  # pad lands in column V
    for i, s in enumerate(ids):
        if len(s):
            padded[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    padded = padded.to(device)
    counts = torch.zeros(len(ids), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _top_k(p: SamplingParams, vocab: int) -> int:
    """The row's effective top-k; 0 when it keeps the whole vocabulary."""
    return p.top_k if 0 < p.top_k < vocab else 0


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows of `x`; `x` itself when `rows` is all of them (they are always ascending)."""
    return x if len(rows) == x.shape[0] else x[_index(rows, x.device)]


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)
