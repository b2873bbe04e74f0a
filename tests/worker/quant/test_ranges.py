"""Clipping ranges: weights keep their absmax; calibrated activations may clip outliers."""

from __future__ import annotations

import torch

from worker.quant.ranges import histogram_range, histograms, kl_threshold, weight_ranges
from worker.quant.scheme import Method


def test_weights_use_each_rows_largest_magnitude() -> None:
    rows = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.25, -0.125], [0.0, 0.0, 0.0]])
    assert weight_ranges(rows).tolist() == [3.0, 0.5, 1.0]  # an all-zero row still gets 1


def test_kl_calibration_of_a_gaussian_clips_its_sparse_tail() -> None:
    mags = torch.randn(1, 200_000, generator=torch.Generator().manual_seed(1)).abs()
    top = mags.amax(dim=1)
    clip = float(kl_threshold(histograms(mags, top, 2048), top)[0])
    assert 2.5 < clip < float(top)


def test_percentile_and_kl_clip_a_rare_activation_outlier_and_absmax_keeps_it() -> None:
    hist = torch.zeros(2048)
    hist[:1000] = 1.0
    hist[2047] = 0.001  # a rare outlier at the very top
    assert histogram_range(hist, 8.0, Method.ABSMAX) == 8.0
    assert histogram_range(hist, 8.0, Method.PERCENTILE) < 4.0
    assert 3.9 < histogram_range(hist, 8.0, Method.KL) < 8.0
    assert histogram_range(hist, 0.0, Method.KL) == 1.0  # a layer that only saw zeros
