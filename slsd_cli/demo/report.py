"""report.md of `slsd demo`: the premise check and the answer first, then the table with its intervals,
the held-out grid, the correction's measured effect,
the figures, the diagnostics and every command run.

`ReportInputs` is filled by the pipeline from the files its steps wrote; `render` only formats.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from slsd_cli.demo import table
from slsd_cli.demo.settings import SHORT_NAMES, DemoSize, format_value
from slsd_cli.demo.tuning import CellResult, Grid, grid_table
from slsd_cli.stats import mean_std


@dataclass
class Step:
    """One `slsd` command of the demo (`skipped`: its output existed already; `seconds`: its wall time
    when it ran, NaN if unknown)."""

    name: str
    argv: list[str]
    skipped: bool = False
    seconds: float = float("nan")


@dataclass
class ReportInputs:
    mode: str                                   # "quick", "full", "tune", "label-efficiency"
    size: DemoSize
    seeds: list[int]
    setup: list[str]                            # bullet lines describing data, backbone, retrieval
    rows: list[table.Row] = field(default_factory=list)
    answer: tuple[str, str, str | None] | None = None  # labels: corrected student, its teacher, uncorrected
    control: str | None = None                  # label of the control row (teacher fine-tuned, no pseudo-labels)
    bootstrap: dict[tuple[str, int], np.ndarray] | None = None
    grids: list[tuple[Grid, list[CellResult]]] = field(default_factory=list)
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)  # grid name -> chosen setting
    diagnostics: list[str] = field(default_factory=list)              # markdown lines
    premise: list[str] = field(default_factory=list)                  # the premise check: the report opens with it
    correction: list[str] = field(default_factory=list)               # the correction's measured effect
    pseudo_labels: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # row label -> per seed
    figures: list[tuple[str, str]] = field(default_factory=list)      # (caption, path relative to report)
    steps: list[Step] = field(default_factory=list)
    elapsed_s: float = 0.0
    peak_memory_mb: float = 0.0


TITLES = {"quick": "Quick pipeline", "full": "Table 1 ablation (paper §4.2)", "tune": "Held-out tuning grid",
          "label-efficiency": "Label efficiency (paper Fig. 2)"}


def render(inputs: ReportInputs) -> str:
    by_label = {row.label: row for row in inputs.rows}
    lines = [f"# slsd demo report — {TITLES.get(inputs.mode, inputs.mode)}", ""]
    if inputs.premise:
        lines += ["## The paper's premise, checked first", ""] + inputs.premise
    if inputs.answer and all(label is None or label in by_label for label in inputs.answer):
        student, teacher, uncorrected = inputs.answer
        lines += [table.answer(by_label[student], by_label[teacher], by_label.get(uncorrected) if uncorrected else None,
                               inputs.bootstrap, control=by_label.get(inputs.control) if inputs.control else None), ""]
    lines += ["## Setup", ""] + inputs.setup + [
        f"- Training seeds: {', '.join(map(str, inputs.seeds))} (the data and the split are generated with seed 0).",
        f"- Wall time {inputs.elapsed_s / 60:.1f} min for this invocation "
        f"({sum(st.skipped for st in inputs.steps)} of {len(inputs.steps)} steps were done before and skipped); "
        f"all steps, when they ran: {_total_minutes(inputs.steps)} (the sum of the steps table, whose steps "
        f"overlap with --jobs > 1); peak memory of this "
        f"invocation {inputs.peak_memory_mb:.0f} MB.",
        f"- Machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
        f"torch {__import__('torch').__version__}.", ""]
    if inputs.rows:
        lines += _results(inputs)
    for grid, results in inputs.grids:
        if results:  # a grid without cells (nothing tuned) has no table
            lines += _grid_section(grid, results, inputs.chosen.get(grid.name))
    lines += inputs.correction
    if inputs.pseudo_labels:
        lines += _pseudo_label_section(inputs.pseudo_labels)
    if inputs.diagnostics:
        lines += ["## Diagnostics", ""] + inputs.diagnostics + [""]
    if inputs.figures:
        lines += ["## Figures", ""]
        for caption, path in inputs.figures:
            lines += [f"**{caption}**", "", f"![{caption}]({path})", ""]
    lines += ["## Steps (rerun any of them alone)", "", "| step | seconds | command |", "|---|---|---|"]
    for st in inputs.steps:
        seconds = f"{st.seconds:.0f}" if st.seconds == st.seconds else "?"
        if st.skipped:
            seconds = f"skipped ({seconds} when run)" if st.seconds == st.seconds else "skipped"
        lines.append(f"| {st.name} | {seconds} | `slsd {' '.join(st.argv)}` |")
    lines.append("")
    return "\n".join(lines)


def _total_minutes(steps: Sequence[Step]) -> str:
    """Sum of the steps' recorded wall times ('≥' when some are unknown)."""
    known = [st.seconds for st in steps if st.seconds == st.seconds]
    if not known:
        return "unknown"
    return f"{'≥ ' if len(known) < len(steps) else ''}{sum(known) / 60:.1f} min"


def _results(inputs: ReportInputs) -> list[str]:
    n = len(inputs.seeds)
    lines = ["## Results on val", "",
             f"Mask AP, APr, APc, APf and box AP in %, ECE (of the detection confidences on val) in %; "
             + (f"mean ± standard deviation over {n} seeds." if n > 1 else "one seed."), ""]
    lines += table.summary_table(inputs.rows) + [""]
    diffs = table.difference_rows(inputs.rows, inputs.bootstrap)
    if diffs:
        lines += ["### Paired differences to the row above", "",
                  "Each cell: the mean over seeds of (row − row above, same seed), then its 95% interval over "
                  "seeds (Student t on the per-seed differences) and over val images (paired bootstrap, the same "
                  "resampled images for both rows, pooled over seeds; ± 1.96 bootstrap standard errors). *Beyond noise* means both intervals exclude 0."
                  + (" With one seed there is no seed interval." if n < 2 else
                     f" With {n} seeds the seed interval is wide: it is honest about how little {n} runs resolve."),
                  ""]
        lines += table.difference_table(diffs) + [""] + table.difference_words(diffs) + [""]
    if inputs.bootstrap:
        noise = table.val_noise(inputs.bootstrap)
        replicates = next(iter(inputs.bootstrap.values())).shape[0]
        lines += [f"Val noise: over {replicates} bootstrap resamples of the {inputs.size.val_images} val images, one "
                  f"model's mask AP moves by ± {noise['AP']:.2f} (std), APr by ± {noise['APr']:.2f}, APc by "
                  f"± {noise['APc']:.2f}, APf by ± {noise['APf']:.2f} points (mean over the runs above). A paired "
                  f"difference is less noisy than either number (both models see the same images); its own interval "
                  f"is the 'val' one above.", ""]
        for column in ("AP", "APr"):
            half, beyond, count = table.val_resolution(diffs, column)
            if count:
                verdict = (" — the val set resolves them." if beyond == count else
                           " — the rest are within the val set's noise (a larger `--val-images` would help).")
                lines.append(f"- {column}: the val interval of a paired difference is ± {half:.2f} points on average; "
                             f"{beyond} of {count} gaps between adjacent rows are larger than their own val interval"
                             + verdict)
        lines.append("")
    return lines


def _grid_section(grid: Grid, results: Sequence[CellResult], chosen: dict[str, Any] | None) -> list[str]:
    lines = [f"## Held-out grid: {grid.name}", "",
             "Each cell trained on `split/train.json` and scored on `split/holdout.json` (the 15% held out, never "
             "val); chosen by held-out mask AP"
             + (f", among cells with {', '.join(f'{SHORT_NAMES.get(k, k)} ≠ {format_value(v)}' for k, v in grid.exclude)}"
                if grid.exclude else "") + ". Later stages fix the earlier stages' choices.", ""]
    lines += grid_table(grid, results) + [""]
    if chosen:
        lines += ["Chosen: " + ", ".join(f"`{k}={format_value(v)}`" for k, v in chosen.items()) + ".", ""]
    return lines


def _pseudo_label_section(pseudo: dict[str, list[dict[str, float]]]) -> list[str]:
    lines = ["## Pseudo-labels per unlabeled image", "",
             "Mean over the distillation's log windows (and seeds); the group is that of the detected class.", "",
             "| Student | all | rare | common | frequent | mean confidence |", "|---|---|---|---|---|---|"]
    for label, entries in pseudo.items():
        def cell(key: str) -> str:
            mean, std, n = mean_std([e[key] for e in entries])
            return "n/a" if n == 0 else f"{mean:.2f}" if n == 1 else f"{mean:.2f} ± {std:.2f}"
        lines.append(f"| {label} | {cell('all')} | {cell('r')} | {cell('c')} | {cell('f')} | {cell('confidence')} |")
    return lines + [""]
