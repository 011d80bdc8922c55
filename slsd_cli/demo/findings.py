"""The report's measured explanations, as markdown lines: the premise check (the teacher's Δ per
group with intervals, and the verdict), what similarity smoothing does at the chosen setting, the
decomposition of the calibration correction's effect on the pseudo-labels, and Δ drift over the
distillation. Each function only formats numbers the pipeline measured (`demo.premise`,
`demo.diagnostics`, `labels.similarity_check`)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from slsd_cli.demo.premise import GROUP_NAMES, GROUPS, interval_text, premise_verdict
from slsd_cli.stats import Interval, mean_std


def _num(value: float, digits: int = 3, signed: bool = False) -> str:
    if value != value:
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def premise_lines(premise: Sequence[Mapping[str, Interval]], seeds: Sequence[int], split: str) -> list[str]:
    """The report's opening: per seed, the teacher's mean Δ per r/c/f group with its 95% interval over
    calibration images, and one plain sentence per distinct verdict."""
    lines = [f"The teacher (similarity smoothing) on the calibration split ({split}): mean CCECE Δ per group with "
             f"its 95% interval (bootstrap over the split's images; Δ < 0 over-confident, Δ > 0 under-confident). "
             f"The paper's premise: frequent classes over-confident, rare classes under-confident.", "",
             "| seed | rare Δ | common Δ | frequent Δ |", "|---|---|---|---|"]
    for seed, intervals in zip(seeds, premise):
        lines.append(f"| {seed} | " + " | ".join(interval_text(intervals[g]) for g in GROUPS) + " |")
    verdicts = list(dict.fromkeys(premise_verdict(p) for p in premise))
    lines.append("")
    if len(verdicts) == 1:
        lines.append(f"**{verdicts[0]}**")
    else:
        lines += [f"- seed {seed}: **{premise_verdict(p)}**" for seed, p in zip(seeds, premise)]
    return lines + [""]


def smoothing_lines(quality: Mapping[str, float], setting: Mapping[str, object]) -> list[str]:
    """What similarity smoothing does at the chosen (ε, γ, τ)."""
    text = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in setting.items())
    return [f"- **Similarity smoothing at the chosen setting** ({text}): total variation between the "
            f"similarity and the uniform targets {_num(quality['tv_uniform'])} per class (0 = the same targets; "
            f"at most ε); the rows of S′ rank the other classes like the true attribute similarity with Spearman "
            f"{_num(quality['row_spearman'], 2)} (mean over classes; S itself: {_num(quality['spearman'], 2)} over "
            f"class pairs). τ rescales the logits of Eq. 2 and so moves mass, never a row's ranking; γ > 0 ranks "
            f"a row by N_j as much as by similarity."]


def correction_lines(effects: Sequence[tuple[str, Mapping[str, float]]]) -> list[str]:
    """The correction's effect, measured on the pseudo-labels each student was given: per label
    (a Table 1 row or a grid cell), the target mass per pseudo-label in each class group before Eq. 5,
    moved in and out by it, and after; and the mean target of the detected class before and after,
    per group of the detected class."""
    if not effects:
        return []
    lines = ["## What the calibration correction did to the pseudo-labels", "",
             "Measured during distillation on every pseudo-label the student was given (not estimated): "
             "*before* is the teacher's normalised probability vector (the plain soft target), *after* the Eq. 5 "
             "target. Mass columns: the share of a pseudo-label's target on rare / common / frequent classes "
             "(before → after; moved in / out, summed per box, so after = before + in − out). Detected-class "
             "columns: the mean target of the box's own class, per group of that class (pseudo-labels per "
             "unlabeled image in brackets).", "",
             "| student | rare mass | common mass | frequent mass | rare box: own class | common box | "
             "frequent box |", "|---|---|---|---|---|---|---|"]
    for label, e in effects:
        mass = [f"{_num(e[f'mass_{g}_before'])} → {_num(e[f'mass_{g}_after'])} (+{_num(e[f'mass_{g}_in'])} / "
                f"−{_num(e[f'mass_{g}_out'])})" for g in GROUPS]
        top = [f"{_num(e[f'top_{g}_before'])} → {_num(e[f'top_{g}_after'])} ({_num(e[f'pl_{g}'], 2)}/img)"
               for g in GROUPS]
        lines.append(f"| {label} | " + " | ".join(mass + top) + " |")
    return lines + [""]


def mean_effect(per_seed: Sequence[Mapping[str, float] | None]) -> dict[str, float] | None:
    """The seeds' mean of `diagnostics.correction_effect` (None when no seed logged it)."""
    present = [e for e in per_seed if e]
    if not present:
        return None
    return {k: mean_std([e[k] for e in present])[0] for k in present[0]}


def drift_lines(before: Sequence[Mapping[str, float]], after: Sequence[Mapping[str, float]],
                split: str) -> list[str]:
    """Δ per group of the teacher that was calibrated (before distillation) and of the EMA teacher at
    the end of it, on the same split: does the Δ Eq. 5 used still describe the teacher that labels?"""
    if not before or not after:
        return []

    def cell(rows: Sequence[Mapping[str, float]], key: str, scale: float = 1.0, digits: int = 3) -> str:
        mean, std, n = mean_std([scale * r[key] for r in rows])
        return _num(mean, digits, signed=scale == 1.0) + ("" if n < 2 or std != std else f" ± {std:.{digits}f}")

    shifts = [abs(mean_std([a[f"delta_{g}"] - b[f"delta_{g}"] for a, b in zip(after, before)])[0]) for g in GROUPS]
    largest = max((s for s in shifts if not math.isnan(s)), default=math.nan)
    scale = max((abs(mean_std([b[f"delta_{g}"] for b in before])[0]) for g in GROUPS), default=math.nan)
    verdict = ("small against the group means themselves: the Δ measured once still describes the teacher that "
               "labels" if largest == largest and largest <= 0.5 * scale else
               "large against the group means themselves: the Δ measured once no longer describes the teacher "
               "that labels at the end (periodic re-calibration would be worth building)")
    return [f"- **Δ drift** (the teacher calibrated before distillation, and the EMA teacher at its end — "
            f"`RUN/teacher/` — on the same split, `{split}`): mean Δ "
            + "; ".join(f"{GROUP_NAMES[g]} {cell(before, f'delta_{g}')} → {cell(after, f'delta_{g}')}" for g in GROUPS)
            + f"; ECE {cell(before, 'ece', 100.0, 1)}% → {cell(after, 'ece', 100.0, 1)}%. The largest shift of a "
              f"group mean, "
              f"{_num(largest)}, is {verdict}."]
