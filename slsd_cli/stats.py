"""Statistics for telling trained models apart: paired differences over seeds with Student-t
intervals and normal bootstrap intervals (rank correlation: `labels.similarity_check`).

Contracts: values are plain floats (or 1-D numpy arrays); NaN marks an undefined value (an AP with
no ground truth) and is left out of a mean, a standard deviation or an interval, which then report
the count `n` they used. Nothing here imports torch.

Why a t-interval over seeds: two rows of a table trained with the same seed share the data order
and initial weights, so their per-seed difference cancels much of the seed-to-seed spread (a paired
design); the mean difference over n seeds has a Student-t distribution with n - 1 degrees of freedom
when the differences are roughly normal. With n = 3 the 97.5% quantile is 4.30, so the interval is
wide: it says honestly how little three seeds can resolve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean (or point estimate) with a two-sided interval; low/high are NaN when undefined."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (NaN bounds never exclude)."""
        return (self.low > 0 and self.high > 0) or (self.low < 0 and self.high < 0)


def _clean(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(list(values), dtype=np.float64)
    return array[~np.isnan(array)]


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, n) of the defined values; std is NaN for n < 2."""
    clean = _clean(values)
    if clean.size == 0:
        return math.nan, math.nan, 0
    std = float(clean.std(ddof=1)) if clean.size > 1 else math.nan
    return float(clean.mean()), std, int(clean.size)


def _t_cdf_upper_half(x: float, df: int) -> float:
    """P(0 <= T <= x) for Student's t with `df` degrees of freedom (Simpson's rule on the density;
    the density is smooth, so 2,000 panels give ~1e-10 accuracy up to the quantiles used here)."""
    if x <= 0:
        return 0.0
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    t = np.linspace(0.0, x, 2001)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df))
    weights = np.ones(t.size)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return float(density @ weights) * (x / 2000) / 3


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile of Student's t with `df` >= 1 degrees of freedom (0.5 < p < 1), by
    bisection on the CDF (no scipy: it is not a dependency)."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    target = p - 0.5
    low, high = 0.0, 1.0
    while _t_cdf_upper_half(high, df) < target:  # df = 1 (Cauchy) needs high ~ 64 for p = 0.995
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        if _t_cdf_upper_half(mid, df) < target:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of the defined values with the Student-t interval mean ± t * s / sqrt(n); the bounds are
    NaN for n < 2 (one seed says nothing about the spread between seeds)."""
    mean, std, n = mean_std(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_differences(rows: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """rows[i] - baseline[i], seed by seed (both lists in the same seed order)."""
    if len(rows) != len(baseline):
        raise ValueError(f"paired values need equal lengths, got {len(rows)} and {len(baseline)}")
    return [float(a) - float(b) for a, b in zip(rows, baseline)]


def bootstrap_indices(size: int, replicates: int, seed: int) -> np.ndarray:
    """[replicates, size] indices drawn with replacement; the same seed gives the same draws."""
    if size < 1 or replicates < 1:
        raise ValueError(f"bootstrap needs size >= 1 and replicates >= 1, got {size}, {replicates}")
    return np.random.default_rng(seed).integers(0, size, size=(replicates, size))


def bootstrap_interval(samples: Sequence[float], estimate: float, confidence: float = 0.95) -> Interval:
    """The normal bootstrap interval: `estimate` ± z * (standard deviation of the bootstrap samples).
    Chosen over percentiles because a CPU budget affords 50-200 replicates, too few for stable 2.5%
    tails, while their standard deviation is already good to ~10%. NaN samples (replicates where the
    value is undefined) are left out."""
    clean = _clean(samples)
    if clean.size < 2:
        return Interval(estimate, math.nan, math.nan, int(clean.size))
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * float(clean.std(ddof=1))
    return Interval(estimate, estimate - half, estimate + half, int(clean.size))
