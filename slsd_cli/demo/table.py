"""Table 1 with statistical power: mean ± std over seeds, and each row's paired difference to the
row above with two 95% intervals.

- **seeds**: the Student-t interval of the per-seed differences (same seed = same data order and
  initial weights, so the pair shares much of its luck). It covers training noise; with 3 seeds
  t = 4.30, so it is wide, and with 1 seed it does not exist.
- **val**: a paired bootstrap over val images, pooled over seeds: in each replicate the mean over
  seeds of (row - row above) on the same resampled images; the observed difference ± 1.96 times the
  standard deviation of those replicates (`stats.bootstrap_interval`). It covers the noise of the
  val set itself, which every seed shares.

A difference is called *beyond noise* when both intervals exclude 0 (only the val interval when
there is one seed, which the report then says). Values are percentages (AP × 100; ECE × 100).

Inputs: `Row`s in table order, each {seed: {column: value}}; bootstrap samples per (row label,
seed) as [replicates, len(BOOTSTRAP_COLUMNS)] arrays in the same units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from slsd_cli.stats import Interval, bootstrap_interval, mean_std, paired_differences, t_interval

COLUMNS = ("AP", "APr", "APc", "APf", "box AP", "ECE")
BOOTSTRAP_COLUMNS = ("AP", "APr", "APc", "APf")  # mask AP, the keys of eval_bootstrap.DEFAULT_KEYS
CONFIDENCE = 0.95


@dataclass
class Row:
    label: str
    values: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> column -> value

    def column(self, name: str, seeds: Sequence[int]) -> list[float]:
        return [self.values[s].get(name, math.nan) for s in seeds]


def metric_columns(metrics: Mapping) -> dict[str, float]:
    """Mask AP, APr, APc, APf and box AP in % from an `slsd eval` metrics.json (NaN if undefined)."""
    def pct(iou_type: str, key: str) -> float:
        value = metrics.get(iou_type, {}).get(key, -1.0)
        return math.nan if value is None or value < 0 else 100.0 * float(value)
    out = {key: pct("segm", key) for key in ("AP", "APr", "APc", "APf")}
    out["box AP"] = pct("bbox", "AP")
    return out


def row_values(metrics: Mapping, ece: float) -> dict[str, float]:
    """The table's columns (in %) from an `slsd eval` metrics.json and a calibration ECE."""
    return {**metric_columns(metrics), "ECE": 100.0 * float(ece)}


@dataclass
class Difference:
    column: str
    seeds: Interval
    val: Interval | None

    def verdict(self) -> str:
        """'beyond noise', 'within noise', or which interval alone excludes 0."""
        if self.seeds.mean != self.seeds.mean:
            return "undefined"
        seed_ok = self.seeds.excludes_zero()
        val_ok = self.val is not None and self.val.excludes_zero()
        if self.seeds.n < 2:
            if self.val is None:
                return "one seed, no interval"
            return "beyond val noise (one seed)" if val_ok else "within val noise (one seed)"
        if self.val is None:
            return "beyond seed noise" if seed_ok else "within seed noise"
        if seed_ok and val_ok:
            return "beyond noise"
        if seed_ok:
            return "beyond seed noise, within val noise"
        if val_ok:
            return "beyond val noise, within seed noise"
        return "within noise"

    def beyond_noise(self) -> bool:
        return self.verdict().startswith("beyond noise") or self.verdict() == "beyond val noise (one seed)"


def common_seeds(a: Row, b: Row) -> list[int]:
    return [s for s in a.values if s in b.values]


def difference(row: Row, above: Row, column: str,
               bootstrap: Mapping[tuple[str, int], np.ndarray] | None = None) -> Difference:
    """`row` - `above` in `column`, paired by seed, with both intervals (val: None when the column
    was not bootstrapped or a sample is missing)."""
    seeds = common_seeds(row, above)
    per_seed = paired_differences(row.column(column, seeds), above.column(column, seeds))
    seed_interval = t_interval(per_seed, CONFIDENCE)
    val = None
    if bootstrap and column in BOOTSTRAP_COLUMNS and seeds and \
            all((r.label, s) in bootstrap for r in (row, above) for s in seeds):
        j = BOOTSTRAP_COLUMNS.index(column)
        samples = np.stack([bootstrap[(row.label, s)][:, j] - bootstrap[(above.label, s)][:, j] for s in seeds])
        with np.errstate(all="ignore"):
            pooled = np.nanmean(samples, axis=0) if samples.size else samples
        val = bootstrap_interval(pooled, seed_interval.mean, CONFIDENCE)
    return Difference(column, seed_interval, val)


def _signed(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:+.{digits}f}"


def _bounds(interval: Interval | None) -> str:
    if interval is None or interval.low != interval.low:
        return "n/a"
    return f"[{interval.low:+.1f}, {interval.high:+.1f}]"


def summary_table(rows: Sequence[Row]) -> list[str]:
    """| Model | AP | APr | APc | APf | box AP | ECE | with mean ± std over seeds."""
    lines = ["| Model | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for column in COLUMNS:
            mean, std, n = mean_std(row.column(column, list(row.values)))
            cells.append("n/a" if n == 0 else f"{mean:.1f}" if n == 1 else f"{mean:.1f} ± {std:.1f}")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return lines


def difference_rows(rows: Sequence[Row], bootstrap: Mapping[tuple[str, int], np.ndarray] | None
                    ) -> list[tuple[Row, Row, list[Difference]]]:
    """(row, row above, its Difference per column) for every row but the first."""
    return [(rows[i], rows[i - 1], [difference(rows[i], rows[i - 1], c, bootstrap) for c in COLUMNS])
            for i in range(1, len(rows))]


def difference_table(diffs: Sequence[tuple[Row, Row, list[Difference]]]) -> list[str]:
    """Paired Δ to the row above: the mean, then its seed and val intervals."""
    lines = ["| Row − row above | " + " | ".join(f"Δ{c}" for c in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for row, above, columns in diffs:
        cells = [f"**{_signed(d.seeds.mean)}**<br>seeds {_bounds(d.seeds)}<br>val {_bounds(d.val)}" for d in columns]
        lines.append(f"| {row.label} − {above.label} | " + " | ".join(cells) + " |")
    return lines


def difference_words(diffs: Sequence[tuple[Row, Row, list[Difference]]], columns: Sequence[str] = ("AP", "APr")
                     ) -> list[str]:
    """One bullet per row: which differences are beyond noise, in words."""
    lines = []
    for row, above, per_column in diffs:
        parts = [f"{d.column} {_signed(d.seeds.mean)} ({d.verdict()})" for d in per_column if d.column in columns]
        lines.append(f"- **{row.label}** vs {above.label}: " + "; ".join(parts) + ".")
    return lines


def val_noise(bootstrap: Mapping[tuple[str, int], np.ndarray]) -> dict[str, float]:
    """Mean over runs of the bootstrap standard deviation of each bootstrapped column: the val-set
    noise of one model's number."""
    out = {}
    for j, column in enumerate(BOOTSTRAP_COLUMNS):
        stds = [float(np.nanstd(samples[:, j], ddof=1)) for samples in bootstrap.values()
                if np.isfinite(samples[:, j]).sum() > 1]
        out[column] = float(np.mean(stds)) if stds else math.nan
    return out


def val_resolution(diffs: Sequence[tuple[Row, Row, list[Difference]]], column: str) -> tuple[float, int, int]:
    """(mean half-width of the val intervals of the paired differences in `column`, how many of the
    gaps |Δ| exceed their own val half-width, how many gaps have a val interval)."""
    widths, beyond = [], 0
    for _, _, per_column in diffs:
        d = next(d for d in per_column if d.column == column)
        if d.val is None or d.val.low != d.val.low:
            continue
        half = (d.val.high - d.val.low) / 2
        widths.append(half)
        beyond += abs(d.seeds.mean) > half
    return (float(np.mean(widths)) if widths else math.nan), beyond, len(widths)


def answer(student: Row, teacher: Row, uncorrected: Row | None,
           bootstrap: Mapping[tuple[str, int], np.ndarray] | None, column: str = "APr",
           control: Row | None = None) -> str:
    """The report's opening: does calibration-corrected distillation raise `column` here, by how much,
    with what intervals (student vs its teacher; vs the same student without the correction; and vs
    the control, the teacher fine-tuned as the students without pseudo-labels)."""
    vs_teacher = difference(student, teacher, column, bootstrap)
    n = vs_teacher.seeds.n
    mean = vs_teacher.seeds.mean
    if mean != mean:
        verdict = "Cannot tell"
    elif vs_teacher.beyond_noise():
        verdict = ("Yes" if mean > 0 else "No — it lowers it") + (", on one seed" if n < 2 else "")
    else:
        verdict = "Not measurably"
    seeds = list(student.values)
    s_mean, s_std, _ = mean_std(student.column(column, seeds))
    t_mean, t_std, _ = mean_std(teacher.column(column, list(teacher.values)))
    spread = (lambda m, s: f"{m:.1f}" if s != s else f"{m:.1f} ± {s:.1f}")
    text = (f"**Does calibration-corrected distillation raise {column} here? {verdict}.** "
            f"The student trained on soft pseudo-labels with the calibration correction reaches mask {column} "
            f"{spread(s_mean, s_std)} against {spread(t_mean, t_std)} for its teacher ({teacher.label.lower()}): "
            f"paired Δ {_signed(mean)} points, 95% interval "
            + (f"over {n} seeds {_bounds(vs_teacher.seeds)}, " if n > 1 else "")
            + f"over val images {_bounds(vs_teacher.val)} ({vs_teacher.verdict()}).")
    if uncorrected is not None:
        vs_soft = difference(student, uncorrected, column, bootstrap)
        text += (f" The correction itself (against the same soft-target student without it) changes {column} by "
                 f"{_signed(vs_soft.seeds.mean)} (seeds {_bounds(vs_soft.seeds)}, val {_bounds(vs_soft.val)}; "
                 f"{vs_soft.verdict()}).")
    if control is not None:
        vs_control = difference(student, control, column, bootstrap)
        by_tuning = difference(control, teacher, column, bootstrap)
        text += (f" Against the control (its teacher fine-tuned for the same iterations without pseudo-labels) the "
                 f"student's {column} differs by {_signed(vs_control.seeds.mean)} (seeds {_bounds(vs_control.seeds)}, "
                 f"val {_bounds(vs_control.val)}; {vs_control.verdict()}): that is what the pseudo-labels do; "
                 f"the fine-tuning alone changes it by {_signed(by_tuning.seeds.mean)} (seeds "
                 f"{_bounds(by_tuning.seeds)}, val {_bounds(by_tuning.val)}; {by_tuning.verdict()}).")
    if n < 2:
        text += (" One seed: the interval covers only the val set's noise, not the variation between training "
                 "runs; `slsd demo --full` runs several seeds.")
    elif n < 5:
        text += f" With {n} seeds the t-interval is wide (t = {_t_factor(n):.2f}): a small real effect can hide in it."
    return text


def _t_factor(n: int) -> float:
    from slsd_cli.stats import t_quantile

    return t_quantile(0.5 + CONFIDENCE / 2, n - 1)
