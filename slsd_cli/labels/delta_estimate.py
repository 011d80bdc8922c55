"""Δ per class where it can be measured: the estimator behind `slsd calibrate`'s `delta`.

Eq. 4's Δ_i is, bins aside, the precision of class i's judged detections minus their mean score,
(correct_i - score_sum_i) / detections_i. Measured on a calibration split it has two weaknesses:

- a class with **no ground-truth instance** in the split has only false positives there: its Δ is
  minus its mean score whatever the detector does (LVIS: a 15 % held-out split of the training set
  holds 0-2 images of most rare classes). Nothing is known about its calibration: `unknown`;
- a class with **few detections or instances** has a precision measured on a handful of them: its Δ
  is noise.

`estimate_delta` therefore shrinks each class's Δ toward the pooled Δ of its frequency group:

    Δ̂_i = (n_i Δ_i + k Δ_group(i)) / (n_i + k)

- `n_i` (`support`) counts the class's judged **detections** (default) or its ground-truth
  **instances** in the calibration data; it is 0 for a class with no instance or no judged
  detection, whose Δ̂ is then the group's Δ (status `unknown`), whatever its detections;
- `Δ_group` is the support-weighted mean Δ of the group's classes with n_i > 0 (sum n_i Δ_i / sum n_i),
  falling back to all such classes when the group has none, and to 0 when no class has any;
- `k` is the support at which a class's own Δ and its group's count equally; k = 0 keeps the
  measured Δ of every class with n_i > 0 (status `estimated`), k > 0 blends it (status `shrunk`).

`raw` is Eq. 4 as measured for every class (0 without a judged detection), the literal reading.
The default (shrink, detections, k = 30) was chosen by `benchmarks/bench_delta_estimators.py`: the
estimator whose Δ̂ on one split best predicts Δ on another (table in docs/method.md, Eq. 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from slsd_cli.errors import InputError

if TYPE_CHECKING:  # numpy is imported where it is used: `slsd calibrate --help` reads the defaults here
    import numpy as np

ESTIMATORS = ("shrink", "raw")
SUPPORTS = ("instances", "detections")
DEFAULT_ESTIMATOR = "shrink"
DEFAULT_SUPPORT = "detections"
DEFAULT_K = 30.0
FREQUENCY_GROUPS = ("r", "c", "f")
ESTIMATED, SHRUNK, UNKNOWN = "estimated", "shrunk", "unknown"


@dataclass(frozen=True)
class DeltaEstimator:
    """How per-class Δ is estimated from its measurement (see the module docstring)."""

    name: str = DEFAULT_ESTIMATOR   # shrink | raw
    k: float = DEFAULT_K            # shrink: the support worth the group's Δ, in [0, inf)
    support: str = DEFAULT_SUPPORT  # shrink: what n_i counts, instances | detections

    def __post_init__(self) -> None:
        if self.name not in ESTIMATORS:
            raise InputError(f"--estimator must be one of {', '.join(ESTIMATORS)}, got {self.name!r}")
        if self.support not in SUPPORTS:
            raise InputError(f"--shrink-support must be one of {', '.join(SUPPORTS)}, got {self.support!r}")
        if not 0.0 <= self.k < float("inf"):
            raise InputError(f"--shrink-k must be a number in [0, inf), got {self.k}")

    def describe(self) -> dict:
        """The estimator as calibration.json records it."""
        if self.name == "raw":
            return {"name": "raw"}
        return {"name": self.name, "k": float(self.k), "support": self.support}


@dataclass
class ClassSupport:
    """Per-class sums over a calibration split's judged detections and its ground truth ([C] each)."""

    detections: np.ndarray  # judged detections
    correct: np.ndarray     # of them, correct (matched)
    score_sum: np.ndarray   # sum of their scores
    instances: np.ndarray   # regular ground-truth instances (not crowd, not ignored)

    def raw_delta(self) -> np.ndarray:
        """Eq. 4 without bins, (correct - score_sum) / detections: the same value (the bins' weights
        N_ib / N_i cancel their own counts); 0 for a class without judged detection."""
        import numpy as np

        out = np.zeros(self.detections.shape, dtype=np.float64)
        np.divide(self.correct - self.score_sum, self.detections, out=out, where=self.detections > 0)
        return out


@dataclass
class DeltaEstimate:
    delta: np.ndarray          # float64 [C]: what Eq. 5 uses
    status: list[str]          # [C]: estimated | shrunk | unknown
    weight: np.ndarray         # float64 [C]: the share of the class's own Δ in `delta`, n / (n + k)
    support: np.ndarray        # float64 [C]: n_i (0 for an unknown class)
    priors: dict[str, float | None]  # group -> its pooled Δ (None: no class of the group has support)


def estimate_delta(support: ClassSupport, frequencies: Sequence[str], estimator: DeltaEstimator,
                   raw: np.ndarray | None = None) -> DeltaEstimate:
    """Δ̂ per class (see the module docstring). `raw`: the measured Δ (default `support.raw_delta()`;
    `slsd calibrate` passes Eq. 4 computed over its bins, equal up to rounding)."""
    import numpy as np

    raw = support.raw_delta() if raw is None else np.asarray(raw, dtype=np.float64)
    has_dets = support.detections > 0
    if estimator.name == "raw":
        status = [ESTIMATED if d else UNKNOWN for d in has_dets.tolist()]
        return DeltaEstimate(raw.copy(), status, has_dets.astype(np.float64), support.detections.astype(np.float64),
                             {g: None for g in FREQUENCY_GROUPS})
    counted = support.instances if estimator.support == "instances" else support.detections
    n = np.where(has_dets & (support.instances > 0), counted, 0).astype(np.float64)
    groups = np.asarray(frequencies)
    overall = _pooled(raw, n)
    priors = {g: _pooled(raw, np.where(groups == g, n, 0.0)) for g in FREQUENCY_GROUPS}
    prior = np.array([priors.get(g) if priors.get(g) is not None else (overall or 0.0) for g in groups.tolist()],
                     dtype=np.float64)
    k = float(estimator.k)
    denominator = n + k
    weight = np.divide(n, denominator, out=np.zeros_like(n), where=denominator > 0)
    delta = np.where(n > 0, weight * raw + (1.0 - weight) * prior, prior)
    status = [UNKNOWN if m == 0 else (ESTIMATED if k == 0 else SHRUNK) for m in n.tolist()]
    return DeltaEstimate(delta, status, weight, n, priors)


def _pooled(raw: np.ndarray, n: np.ndarray) -> float | None:
    """Support-weighted mean Δ over the classes with n > 0 (None when there is none)."""
    total = n.sum()
    return float((n * raw).sum() / total) if total > 0 else None
