"""Clipping ranges for symmetric int8: the magnitude that maps to 127.

Weights use each row's (or group's) largest magnitude. Clipping weight outliers was tried and
rejected: on SmolLM2 the KL-chosen thresholds clip rows to 0.8-0.9 of their maximum and raise
the weight error five-fold, because the few large weights of a row carry real signal.
Calibrated activations pool many tokens, where rare outliers are noise worth clipping, so
they offer the three methods of `Method`.
"""

from __future__ import annotations

import math

import torch

from worker.quant.scheme import QMAX, Method

ACTIVATION_PERCENTILE = 99.99
"""Percentile of calibrated activation magnitudes kept by the percentile method."""
ACTIVATION_BINS = 2048
"""Histogram bins of a layer input's magnitudes, as in TensorRT's entropy calibration."""
_LEVELS = QMAX + 1  # magnitudes 0..127 of a symmetric int8 grid


def weight_ranges(rows: torch.Tensor) -> torch.Tensor:
    """rows: [R, n] float -> [R] largest magnitude of each row (1 for an all-zero row)."""
    amax = rows.abs().float().amax(dim=-1)
    return torch.where(amax > 0, amax, torch.ones_like(amax))


def histograms(mags: torch.Tensor, top: torch.Tensor, bins: int) -> torch.Tensor:
    """mags: [R, n] >= 0, top: [R] -> [R, bins] counts of each row over [0, top]."""
    scale = bins / top.clamp_min(torch.finfo(torch.float32).tiny)
    index = (mags * scale[:, None]).long().clamp_(0, bins - 1)
    return torch.zeros(mags.shape[0], bins, dtype=torch.float32).scatter_add_(
        1, index, torch.ones(index.shape))


def histogram_range(hist: torch.Tensor, top: float, method: Method) -> float:
    """One layer's activation range from its magnitude histogram [bins] over [0, top]."""
    if method is Method.ABSMAX or top <= 0:
        return top if top > 0 else 1.0
    if method is Method.PERCENTILE:
        cdf = hist.cumsum(0) / hist.sum().clamp_min(1)
        first = int(torch.searchsorted(cdf, ACTIVATION_PERCENTILE / 100))
        return top * min(first + 1, len(hist)) / len(hist)
    return float(kl_threshold(hist[None], torch.tensor([top]))[0])


def kl_threshold(hist: torch.Tensor, top: torch.Tensor, step: int = 16) -> torch.Tensor:
    """TensorRT's entropy calibration over rows: hist [R, B] of magnitudes over [0, top [R]].

    For each candidate edge i (multiples of `step` from 128 bins up to B): P is the histogram
    cut at i with the clipped tail added to its last bin; Q is the same bins merged into 128
    int8 levels and spread back evenly over the non-empty bins of each level. The edge whose
    KL(P || Q) is smallest gives the threshold top * i / B.
    """
    rows, bins = hist.shape
    hist = hist.float()
    zero = torch.zeros(rows, 1)
    mass_cum = torch.cat([zero, hist.cumsum(dim=1)], dim=1)  # [R, B + 1]
    nonzero = (hist > 0).float()
    count_cum = torch.cat([zero, nonzero.cumsum(dim=1)], dim=1)
    best_kl = torch.full((rows,), math.inf)
    best_edge = torch.full((rows,), float(bins))
    for edge in range(_LEVELS, bins + 1, step):
        # level l merges bins [ceil(l * edge / 128), ceil((l + 1) * edge / 128))
        bounds = (torch.arange(_LEVELS + 1) * edge + _LEVELS - 1) // _LEVELS
        level = torch.arange(edge) * _LEVELS // edge  # [edge]
        mass = mass_cum[:, bounds[1:]] - mass_cum[:, bounds[:-1]]  # [R, 128]
        count = count_cum[:, bounds[1:]] - count_cum[:, bounds[:-1]]
        q = (mass / count.clamp_min(1))[:, level] * nonzero[:, :edge]
        p = hist[:, :edge].clone()
        p[:, -1] += mass_cum[:, -1] - mass_cum[:, edge]
        kl = _kl(p, q)
        better = kl < best_kl
        best_kl = torch.where(better, kl, best_kl)
        best_edge = torch.where(better, torch.tensor(float(edge)), best_edge)
    return top.float() * best_edge / bins


def _kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """KL(P || Q) per row of two unnormalized histograms; Q is smoothed where P has mass."""
    p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
    q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)
    q = torch.where((p > 0) & (q == 0), torch.full_like(q, eps), q)
    terms = torch.where(p > 0, p * (p / q.clamp_min(1e-12)).log(), torch.zeros_like(p))
    return terms.sum(dim=1)
