"""The paper's premise, checked before Table 1: is the teacher's frequent group over-confident
(mean Δ < 0) and its rare group under-confident (mean Δ > 0) on the calibration split?

Each group's mean Δ is the one `slsd calibrate` writes (`groups[g].mean_delta`, with its default
estimator); its 95% interval comes from a bootstrap over calibration images: each replicate draws
the images with replacement (`evaluation.bootstrap.Resampler`: an image drawn k times enters k
times, with its ground truth, its negative lists and the teacher's detections on it) and
recomputes calibration.json's group means by the same `calibrate_detections`. The interval is
the estimate ± 1.96 bootstrap standard deviations (`stats.bootstrap_interval`), as for Table 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np

from slsd_cli.data.lvis import FREQUENCY_GROUPS as GROUPS
from slsd_cli.data.lvis import GROUP_NAMES
from slsd_cli.stats import Interval, bootstrap_indices, bootstrap_interval


def _group_means(calibration: Mapping) -> dict[str, float]:
    out = {}
    for g in GROUPS:
        value = calibration.get("groups", {}).get(g, {}).get("mean_delta")
        out[g] = math.nan if value is None else float(value)
    return out


def delta_intervals(annotations_path: str | Path, detections_path: str | Path, replicates: int = 200,
                    seed: int = 0) -> dict[str, Interval]:
    """Per r/c/f group: the mean Δ of `slsd calibrate` on these detections, with its 95% bootstrap
    interval over the annotations' images (NaN bounds where a group is undefined)."""
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.data.results import read_results
    from slsd_cli.evaluation.bootstrap import Resampler
    from slsd_cli.labels.calibration import calibrate_detections

    annotations = load_annotations(annotations_path)
    detections = read_results(detections_path, annotations)
    estimate = _group_means(calibrate_detections(detections, annotations))
    resample = Resampler(annotations, {"teacher": detections})
    samples = np.full((replicates, len(GROUPS)), np.nan)
    for i, draw in enumerate(bootstrap_indices(len(annotations.image_ids), replicates, seed)):
        sample, dets = resample(draw.tolist())
        means = _group_means(calibrate_detections(dets["teacher"], sample))
        samples[i] = [means[g] for g in GROUPS]
    return {g: bootstrap_interval(samples[:, k], estimate[g]) for k, g in enumerate(GROUPS)}


def premise_verdict(intervals: Mapping[str, Interval]) -> str:
    """One plain sentence: does the premise hold (frequent Δ < 0 and rare Δ > 0, both intervals
    excluding 0), hold only as a tendency (the signs right, an interval touching 0), or not."""
    rare, frequent = intervals["r"], intervals["f"]
    if rare.mean != rare.mean or frequent.mean != frequent.mean:
        return "The premise cannot be checked here: a group has no judged detection on the calibration split."
    if rare.low > 0 and frequent.high < 0:
        return ("The paper's premise holds here: frequent classes are over-confident and rare classes "
                "under-confident, both beyond the bootstrap noise.")
    if rare.mean > 0 and frequent.mean < 0:
        return ("The paper's premise holds only as a tendency here: the signs are right (frequent over-, rare "
                "under-confident) but an interval includes 0.")
    parts = []
    if not frequent.mean < 0:
        parts.append(f"frequent classes are not over-confident (Δ {frequent.mean:+.3f})")
    if not rare.mean > 0:
        parts.append(f"rare classes are not under-confident (Δ {rare.mean:+.3f})")
    return "The paper's premise does not hold here: " + " and ".join(parts) + "."


def interval_text(interval: Interval, digits: int = 3) -> str:
    if interval.mean != interval.mean:
        return "n/a"
    if interval.low != interval.low:
        return f"{interval.mean:+.{digits}f}"
    return f"{interval.mean:+.{digits}f} [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]"
