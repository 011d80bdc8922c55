"""The paper's figures from slsd's output files (matplotlib, Agg; PNG and PDF).

* `reliability_figure` - reliability diagrams side by side, ECE in each title (paper Fig. 3), from
  calibration.json files (`slsd calibrate`); a frequency group with no judged detection reads n/a
  (its `ece` is null, or 0.0 with `count` 0 in older files).
* `ap_vs_frequency_figure` - per-class AP against the class's training instance count, log x,
  coloured by frequency group, with each group's mean AP as a line of the same colour (Fig. 4), from
  one metrics.json (`slsd eval`) or two (teacher hollow, student filled) and the training json.
* `label_efficiency_figure` - AP and APr against the labeled fraction, one line per method (Fig. 2),
  from several metrics.json files, each with top-level `method` (text) and `labeled_fraction` (0-1)
  keys unless given on the command line.
* `predictions_figure` - masks, boxes and class names over images (Fig. 5), one row per detections
  json (teacher, student), optionally a ground-truth row.

Each builds a `matplotlib.figure.Figure` of a fixed size (no pyplot, no global state); `save_figure`
writes it as `<stem>.png` and `<stem>.pdf` (one set of outputs: both or neither), refusing existing
files unless forced; `write_<kind>` is the whole of `slsd plot KIND` (check outputs, read, draw, save). Panels are named
after each file's run (`run_label`). metrics.json holds AP as fractions in [0, 1] (-1 = undefined,
the official tools' convention); the figures show percent, on an axis that never goes below 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg canvas; pyplot is never used
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, NullFormatter
from pycocotools import mask as mask_utils

from slsd_cli.data.images import load_image
from slsd_cli.data.lvis import FREQUENCY_GROUPS as GROUPS  # LVIS frequency groups, in plotting order
from slsd_cli.data.lvis import GROUP_NAMES, Annotations, segmentation_to_rle
from slsd_cli.errors import InputError
from slsd_cli.io import FileSet, check_output, read_json
from slsd_cli.data.results import read_results

DPI = 150
PANEL_IN = 4.0  # reliability / label-efficiency panel side, inches
GROUP_COLOURS = {"r": "#d62728", "c": "#1f77b4", "f": "#2ca02c"}  # one colour per group, dots and lines alike
IOU_TYPES = ("segm", "bbox")
MAX_PREDICTION_IMAGES = 16
PREDICTION_PANEL_IN = 3.0  # predictions panel width, inches
LINE_STYLES = ("-", "--", "-.", ":")  # methods that coincide stay visible


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _new_figure(width_in: float, height_in: float, dpi: int = DPI) -> Figure:
    if not (isinstance(dpi, int) and 10 <= dpi <= 1200):
        raise InputError(f"--dpi must be an integer in 10..1200, got {dpi!r}")
    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------- output


def figure_paths(out: str | Path) -> tuple[Path, Path]:
    """`FIG.png` (or any suffix, or none) -> (FIG.png, FIG.pdf)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".png", ".pdf") else out
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")


def check_figure_outputs(out: str | Path, force: bool) -> tuple[Path, Path]:
    """Refuse existing outputs before any work (unless forced)."""
    png, pdf = figure_paths(out)
    check_output(png, force)
    check_output(pdf, force)
    return png, pdf


def save_figure(fig: Figure, out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Write `fig` as PNG and PDF next to each other, as one set of outputs (both or neither);
    metadata without dates, so the same figure gives the same PNG bytes."""
    png, pdf = figure_paths(out)
    # one set: an interrupted run leaves neither file, so a plain rerun needs no --force
    with FileSet([png, pdf], force) as files:
        fig.savefig(files.stage(png), format="png", dpi=fig.dpi, metadata={"Software": None})
        fig.savefig(files.stage(pdf), format="pdf", metadata={"CreationDate": None, "Creator": None, "Producer": None})
    return png, pdf


# ---------------------------------------------------------------- reliability (Fig. 3)


@dataclass
class Calibration:
    ece: float
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    groups: dict[str, dict]


def read_calibration(path: str | Path) -> Calibration:
    """Read and check a calibration.json (`slsd calibrate`)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError("not a calibration file (top level must be an object)", path=path)
    if not _number(data.get("ece")):
        raise InputError("not a calibration file (no numeric 'ece'; see slsd calibrate)", path=path)
    bins = data.get("reliability")
    if not isinstance(bins, list) or not bins:
        raise InputError("not a calibration file (no 'reliability' list of bins)", path=path)
    n = len(bins)
    rows = {k: np.zeros(n) for k in ("count", "accuracy", "confidence", "lower", "upper")}
    for b, entry in enumerate(bins):
        if not isinstance(entry, dict):
            raise InputError("a bin must be an object", path=path, record=f"reliability[{b}]")
        for key in ("count", "accuracy", "confidence"):
            if not _number(entry.get(key)):
                raise InputError(f"missing or non-numeric '{key}'", path=path, record=f"reliability[{b}]")
            rows[key][b] = entry[key]
        if entry["count"] < 0 or not (0 <= entry["accuracy"] <= 1 and 0 <= entry["confidence"] <= 1):
            raise InputError("count must be >= 0, accuracy and confidence in [0, 1]", path=path,
                             record=f"reliability[{b}]")
        lower, upper = entry.get("lower", b / n), entry.get("upper", (b + 1) / n)
        if not (_number(lower) and _number(upper) and 0 <= lower < upper <= 1):
            raise InputError(f"bin edges must satisfy 0 <= lower < upper <= 1, got {lower!r}, {upper!r}",
                             path=path, record=f"reliability[{b}]")
        rows["lower"][b], rows["upper"][b] = lower, upper
    groups = data.get("groups", {})
    if not isinstance(groups, dict):
        raise InputError("'groups' must be an object", path=path)
    return Calibration(float(data["ece"]), rows["count"], rows["accuracy"], rows["confidence"], rows["lower"],
                       rows["upper"], {g: v for g, v in groups.items() if isinstance(v, dict)})


def reliability_figure(calibrations: Sequence[Calibration], labels: Sequence[str], dpi: int = DPI) -> Figure:
    """One reliability diagram per calibration, side by side: per confidence bin, the accuracy
    (bar) against the mean confidence (the gap shaded), the diagonal, and the share of detections
    per bin underneath."""
    if len(calibrations) != len(labels):
        raise InputError(f"{len(labels)} labels for {len(calibrations)} calibration files")
    n = len(calibrations)
    fig = _new_figure(PANEL_IN * n, PANEL_IN * 1.3, dpi)
    grid = fig.add_gridspec(2, n, height_ratios=[4, 1])
    for i, (cal, label) in enumerate(zip(calibrations, labels)):
        ax = fig.add_subplot(grid[0, i])
        hist = fig.add_subplot(grid[1, i], sharex=ax)
        width = cal.upper - cal.lower
        used = cal.counts > 0
        ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect calibration")
        ax.bar(cal.lower[used], cal.accuracy[used], width=width[used], align="edge", color="#1f77b4",
               edgecolor="black", lw=0.6, label="accuracy")
        gap_lo = np.minimum(cal.accuracy, cal.confidence)[used]
        gap_hi = np.maximum(cal.accuracy, cal.confidence)[used]
        ax.bar(cal.lower[used], gap_hi - gap_lo, bottom=gap_lo, width=width[used], align="edge",
               fill=False, edgecolor="#d62728", hatch="///", lw=0.8, label="gap to mean confidence")
        ax.plot(cal.confidence[used], cal.accuracy[used], "o", color="black", ms=3, label="(confidence, accuracy)")
        title = f"{label}: ECE {cal.ece:.3f}"
        group_ece = [f"{g} {group_ece_text(cal.groups[g])}" for g in GROUPS if g in cal.groups]
        if group_ece:
            title += "\n(" + ", ".join(group_ece) + ")"
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_aspect("auto")
        ax.grid(alpha=0.3)
        ax.tick_params(labelbottom=False)
        total = cal.counts.sum()
        share = cal.counts / total if total > 0 else cal.counts
        hist.bar(cal.lower, share, width=width, align="edge", color="0.5", edgecolor="black", lw=0.5)
        hist.set_xlabel("confidence")
        hist.set_ylabel("share", fontsize=8)
        hist.set_ylim(0, max(float(share.max()), 1e-6) * 1.1)
        hist.text(0.02, 0.9, f"{int(total)} detections", transform=hist.transAxes, ha="left", va="top", fontsize=7)
    handles, names = fig.axes[0].get_legend_handles_labels()
    # 4 entries need ~2 panel widths in one row: a single panel puts them on two rows (not clipped)
    fig.legend(handles, names, loc="outside lower center", ncols=min(4, 2 * n), fontsize=7, frameon=False)
    return fig


def group_ece_text(group: dict) -> str:
    """A frequency group's ECE for a title: 'n/a' when the group had no detection to judge (written
    as null by `slsd calibrate`; older files wrote 0.0 with `count` 0)."""
    ece = group.get("ece")
    if not _number(ece) or group.get("count") == 0 or group.get("classes_with_detections") == 0:
        return "n/a"
    return f"{ece:.3f}"


GENERIC_FOLDERS = {"", ".", "eval", "evaluation", "calibration", "calibrate", "calib", "metrics", "out",
                   "output", "outputs", "results", "plots", "figures"}


def run_label(path: str | Path) -> str:
    """The name a figure gives a file: its run (the nearest folder holding model.json, e.g.
    runs/teacher for runs/teacher/eval/calibration.json), else the nearest folder whose name is not
    generic ('eval', 'calibration', ...), else the file's stem."""
    path = Path(path)
    parents = list(path.resolve().parents)[:4]
    for folder in parents:
        if (folder / "model.json").is_file():
            return folder.name
    for folder in path.parents:
        if folder.name not in GENERIC_FOLDERS:
            return folder.name
    return path.stem


def default_labels(paths: Sequence[str | Path]) -> list[str]:
    """`run_label` of each file; where two files would get the same name, their paths instead."""
    labels = [run_label(p) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(Path(p).with_suffix("")) for p in paths]
    return labels


# ---------------------------------------------------------------- AP vs frequency (Fig. 4)


def read_metrics(path: str | Path) -> dict:
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not any(isinstance(data.get(t), dict) for t in IOU_TYPES):
        raise InputError("not a metrics file (no 'segm' or 'bbox' object; see slsd eval)", path=path)
    return data


def _metric_section(metrics: dict, iou_type: str, path: str | Path) -> dict:
    if iou_type not in IOU_TYPES:
        raise InputError(f"unknown IoU type {iou_type!r} (use segm or bbox)")
    section = metrics.get(iou_type)
    if not isinstance(section, dict):
        raise InputError(f"no '{iou_type}' metrics (pass --iou-type {'bbox' if iou_type == 'segm' else 'segm'}?)",
                         path=path)
    return section


def _ap_value(value: Any, path: str | Path, record: str) -> float | None:
    """An AP in [0, 1], or None for -1 (undefined)."""
    if not _number(value):
        raise InputError(f"AP must be a number, got {value!r}", path=path, record=record)
    if value == -1:
        return None
    if not 0 <= value <= 1:
        raise InputError(f"AP must be a fraction in [0, 1] (or -1 when undefined), got {value!r}", path=path,
                         record=record)
    return float(value)


def per_class_points(metrics: dict, annotations: Annotations, iou_type: str, path: str | Path
                     ) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """(training instance count, AP, group) of every class with a defined AP, and the number of
    classes whose AP is undefined (-1) or missing."""
    points = _class_points(metrics, annotations, iou_type, path)
    xs = np.array([x for x, _, _ in points.values()], dtype=np.float64)
    ys = np.array([ap for _, ap, _ in points.values()], dtype=np.float64)
    return xs, ys, [g for _, _, g in points.values()], annotations.num_classes - len(points)


def spread_labels(values: Sequence[float], min_gap: float) -> list[float]:
    """Label positions near `values` (same order) at least `min_gap` apart, so texts never overlap."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    placed = [0.0] * len(values)
    last = -math.inf
    for i in order:
        placed[i] = max(values[i], last + min_gap)
        last = placed[i]
    return placed


def _class_points(metrics: dict, annotations: Annotations, iou_type: str, path: str | Path
                  ) -> dict[int, tuple[float, float, str]]:
    """{category id: (training instance count, AP, group)} of the classes with a defined AP."""
    section = _metric_section(metrics, iou_type, path)
    per_class = section.get("per_class")
    if not isinstance(per_class, dict):
        raise InputError(f"no '{iou_type}.per_class' object", path=path)
    index = annotations.category_index
    counts = annotations.instance_counts()
    groups = annotations.frequencies()
    points = {}
    for key, value in per_class.items():
        record = f"{iou_type}.per_class.{key}"
        try:
            cid = int(key)
        except ValueError:
            raise InputError(f"category id {key!r} is not an integer", path=path, record=record) from None
        if cid not in index:
            raise InputError(f"category id {cid} is not in {annotations.path}", path=path, record=record)
        ap = _ap_value(value, path, record)
        if ap is not None:
            points[cid] = (float(counts[index[cid]]), ap, groups[index[cid]])
    return points


def ap_vs_frequency_figure(metrics: dict | Sequence[dict], annotations: Annotations, iou_type: str = "segm",
                           metrics_path: str | Path | Sequence[str | Path] = "metrics.json",
                           title: str | None = None, labels: Sequence[str] | None = None,
                           dpi: int = DPI) -> Figure:
    """Per-class AP against the training instance count (log x), coloured r/c/f, with each group's
    mean per-class AP as a dashed line in the same colour (groups from the training json, for dots
    and lines alike: LVIS's APr/APc/APf definition). Two metrics files (teacher, student: the paper's
    Fig. 4) draw the first as hollow markers, the second filled, each class joined by a thin line,
    and label the group lines 'APr first -> second'."""
    runs = [metrics] if isinstance(metrics, dict) else list(metrics)
    paths = [metrics_path] if isinstance(metrics_path, (str, Path)) else list(metrics_path)
    if not 1 <= len(runs) <= 2 or len(paths) != len(runs):
        raise InputError(f"ap-vs-frequency takes one or two metrics files, got {len(runs)}")
    labels = list(labels) if labels else [Path(p).parent.name or Path(p).stem for p in paths]
    if len(labels) != len(runs):
        raise InputError(f"{len(labels)} labels for {len(runs)} metrics files")
    points = [_class_points(m, annotations, iou_type, p) for m, p in zip(runs, paths)]
    for pts, path in zip(points, paths):
        if not pts:
            raise InputError(f"no class has a defined {iou_type} AP (all -1)", path=path)
    fig = _new_figure(6.4, 4.4, dpi)
    ax = fig.add_subplot()
    all_x = np.array([x for pts in points for x, _, _ in pts.values()])
    x_of = lambda x: max(x, 0.5)  # noqa: E731  classes absent from training sit at the left edge, labelled 0
    two = len(runs) == 2
    if two:  # one thin segment per class present in both: how far each class moved
        for cid in points[0].keys() & points[1].keys():
            x, a0, g = points[0][cid]
            ax.plot([x_of(x)] * 2, [100 * a0, 100 * points[1][cid][1]], color=GROUP_COLOURS[g], lw=0.6,
                    alpha=0.5, zorder=2)
    group_means: dict[str, list[float | None]] = {g: [] for g in GROUPS}
    for r, pts in enumerate(points):
        last = r == len(points) - 1
        for g in GROUPS:
            sel = [(x, ap) for x, ap, gg in pts.values() if gg == g]
            group_means[g].append(float(np.mean([ap for _, ap in sel])) if sel else None)
            if not sel:
                continue
            xs = np.array([x_of(x) for x, _ in sel])
            ys = 100 * np.array([ap for _, ap in sel])
            style = ({"color": GROUP_COLOURS[g], "edgecolor": "black"} if last else
                     {"facecolor": "none", "edgecolor": GROUP_COLOURS[g]})
            ax.scatter(xs, ys, s=22, alpha=0.85, lw=0.8 if not last else 0.4, zorder=3, **style,
                       label=f"{GROUP_NAMES[g]} ({len(sel)})" if last else None)
    texts, heights, colours = [], [], []
    for g in GROUPS:
        means = group_means[g]
        for r, mean in enumerate(means):
            if mean is not None:
                ax.axhline(100 * mean, color=GROUP_COLOURS[g], lw=1, alpha=0.8,
                           ls="--" if r == len(means) - 1 else ":")
        shown = ["n/a" if m is None else f"{100 * m:.1f}" for m in means]
        if all(m is None for m in means):
            continue
        texts.append(f"AP{g} {' -> '.join(shown)}")
        heights.append(100 * next(m for m in reversed(means) if m is not None))
        colours.append(GROUP_COLOURS[g])
    for text, y, colour in zip(texts, spread_labels(heights, 6.0), colours):
        ax.text(1.01, y, text, color=colour, fontsize=7, va="center", transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    x_plot = np.maximum(all_x, 0.5)
    left = 0.4 if (all_x < 1).any() else max(0.8, float(all_x.min()) * 0.8)
    ax.set_xlim(left, float(x_plot.max()) * 1.5)
    if (all_x < 1).any():
        ticks = [0.5] + [10.0 ** k for k in range(0, int(math.log10(x_plot.max())) + 1)]
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "0" if v < 1 else f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(-1, 101)  # AP is never negative; the margin keeps AP 0 / 100 markers whole
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlabel("training instances of the class (log scale)")
    ax.set_ylabel(f"{iou_type} AP per class (%)")
    head = title or f"Per-class {iou_type} AP vs training frequency"
    aps = [m[iou_type].get("AP") for m in runs]
    if all(_number(a) and 0 <= a <= 1 for a in aps):
        head += " (AP " + " -> ".join(f"{100 * a:.1f}" for a in aps) + ")"
    if two:
        head += f"\nhollow: {labels[0]}, filled: {labels[1]}"
    ax.set_title(head, fontsize=10)
    skipped = annotations.num_classes - len(points[-1])
    if skipped:
        ax.text(0.01, 0.99, f"{skipped} class{'es' if skipped > 1 else ''} without a defined AP not shown"
                + (f" ({labels[-1]})" if two else ""), transform=ax.transAxes, fontsize=7, va="top")
    ax.grid(alpha=0.3, which="both")
    means = f"dashed: group mean ({labels[1]}), dotted: {labels[0]}" if two else "dashed: group mean"
    ax.legend(loc="lower right", fontsize=8, title=f"group (classes)\n{means}", title_fontsize=7)
    return fig


# ---------------------------------------------------------------- label efficiency (Fig. 2)


@dataclass
class Run:
    method: str
    fraction: float
    ap: float | None
    apr: float | None
    path: str


def label_efficiency_runs(paths: Sequence[str | Path], methods: Sequence[str] | None = None,
                          fractions: Sequence[float] | None = None, iou_type: str = "segm") -> list[Run]:
    """One run per metrics file: its method and labeled fraction from `methods` / `fractions`
    (aligned with `paths`) or else from the file's `method` / `labeled_fraction` keys."""
    if methods is not None and len(methods) != len(paths):
        raise InputError(f"--methods has {len(methods)} entries for {len(paths)} metrics files")
    if fractions is not None and len(fractions) != len(paths):
        raise InputError(f"--fractions has {len(fractions)} entries for {len(paths)} metrics files")
    runs, seen = [], {}
    for i, path in enumerate(paths):
        metrics = read_metrics(path)
        method = methods[i] if methods is not None else metrics.get("method")
        if not isinstance(method, str) or not method:
            raise InputError("no 'method' in the file; pass --methods", path=path)
        fraction = fractions[i] if fractions is not None else metrics.get("labeled_fraction")
        if not _number(fraction):
            raise InputError("no numeric 'labeled_fraction' in the file; pass --fractions", path=path)
        if not 0 < fraction <= 1:
            raise InputError(f"labeled fraction must be in (0, 1], got {fraction}", path=path)
        section = _metric_section(metrics, iou_type, path)
        values = []
        for key in ("AP", "APr"):
            if key not in section:
                raise InputError(f"no '{iou_type}.{key}'", path=path)
            values.append(_ap_value(section[key], path, f"{iou_type}.{key}"))
        key = (method, float(fraction))
        if key in seen:
            raise InputError(f"method {method!r} at fraction {fraction:g} is also given by {seen[key]}", path=path)
        seen[key] = str(path)
        runs.append(Run(method, float(fraction), values[0], values[1], str(path)))
    return runs


def label_efficiency_figure(runs: Sequence[Run], iou_type: str = "segm", dpi: int = DPI) -> Figure:
    """AP (left) and APr (right) against the labeled fraction (log x, in percent), one line per
    method in the order they first appear; undefined values (-1) leave a gap."""
    if not runs:
        raise InputError("no metrics files given")
    methods = list(dict.fromkeys(r.method for r in runs))
    fig = _new_figure(2 * PANEL_IN + 1.6, PANEL_IN, dpi)
    axes = fig.subplots(1, 2)
    fractions = sorted({r.fraction for r in runs})
    markers = "osD^v<>Ph*"
    for ax, key, name in ((axes[0], "ap", "AP"), (axes[1], "apr", "AP$_r$")):
        for m, method in enumerate(methods):
            mine = sorted((r for r in runs if r.method == method), key=lambda r: r.fraction)
            x = np.array([100 * r.fraction for r in mine])
            y = np.array([np.nan if getattr(r, key) is None else 100 * getattr(r, key) for r in mine])
            ax.plot(x, y, marker=markers[m % len(markers)], ms=5, lw=1.5, ls=LINE_STYLES[m % len(LINE_STYLES)],
                    label=method)
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in fractions])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if len(fractions) == 1:
            ax.set_xlim(100 * fractions[0] / 2, 100 * fractions[0] * 2)
        ax.set_ylim(bottom=0)  # AP is never negative (matplotlib's margin would show -2%)
        ax.set_xlabel("labeled data (% of the training set)")
        ax.set_ylabel(f"{iou_type} {name} (%)")
        ax.set_title(f"{name} vs labeled fraction", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, title="method", title_fontsize=8)
    return fig


# ---------------------------------------------------------------- predictions (Fig. 5)


def read_detections(path: str | Path, annotations: Annotations) -> list[dict]:
    """A detections file, read and validated by the one results reader, as results records."""
    return read_results(path, annotations).records()


def choose_images(detections: list[dict], annotations: Annotations, ids: Sequence[int] | None, score: float,
                  max_images: int) -> list[int]:
    """The given ids (checked), else the first `max_images` image ids with a detection >= score
    (then other images, in id order, if too few have one)."""
    if ids:
        for image_id in ids:
            if image_id not in annotations.images:
                raise InputError(f"image id {image_id} is not in {annotations.path}", record="--ids")
        if len(ids) > MAX_PREDICTION_IMAGES:
            raise InputError(f"at most {MAX_PREDICTION_IMAGES} images per figure, got {len(ids)}", record="--ids")
        return list(dict.fromkeys(ids))
    if max_images < 1 or max_images > MAX_PREDICTION_IMAGES:
        raise InputError(f"--max-images must be 1..{MAX_PREDICTION_IMAGES}, got {max_images}")
    with_dets = sorted({d["image_id"] for d in detections if d["score"] >= score})
    chosen = with_dets[:max_images]
    for image_id in annotations.image_ids:
        if len(chosen) >= max_images:
            break
        if image_id not in chosen:
            chosen.append(image_id)
    return chosen


def _category_colour(index: int) -> np.ndarray:
    return np.array(mpl.colormaps["tab20"](index % 20)[:3])


def _draw_instances(ax, image: np.ndarray, instances: list[dict], annotations: Annotations, show_scores: bool) -> None:
    height, width = image.shape[:2]
    canvas = image.astype(np.float32) / 255.0
    boxes = []
    for inst in instances:
        colour = _category_colour(annotations.category_index[inst["category_id"]])
        seg = inst.get("segmentation")
        box = inst.get("bbox")
        if seg is not None:
            rle = segmentation_to_rle(seg, height, width)
            mask = mask_utils.decode(rle).astype(bool)
            canvas[mask] = 0.5 * canvas[mask] + 0.5 * colour
            if box is None:
                box = [float(v) for v in mask_utils.toBbox(rle)]
        boxes.append((box, colour, inst))
    ax.imshow(np.clip(canvas, 0, 1), interpolation="nearest")
    categories = {c["id"]: c for c in annotations.categories}
    for box, colour, inst in boxes:
        name = categories[inst["category_id"]]["name"]
        label = f"{name} {inst['score']:.2f}" if show_scores else name
        if box is not None:
            x, y, w, h = box
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=colour, lw=1.2))
            tx, ty = x - 0.5, y - 0.5
        else:
            tx, ty = 0, 0
        ax.text(tx, ty, label, fontsize=5, color="white", va="bottom", ha="left", clip_on=True,
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.6, "lw": 0})
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def prediction_row_height(annotations: Annotations, image_ids: Sequence[int]) -> float:
    """Inches per row: panels are PREDICTION_PANEL_IN wide and as tall as the tallest image's aspect
    needs (0.5-2x the width), so landscape images leave no empty band."""
    aspect = max(annotations.images[i]["height"] / annotations.images[i]["width"] for i in image_ids)
    return round(PREDICTION_PANEL_IN * min(2.0, max(0.5, aspect)) + 0.25, 2)  # + the panel title


def predictions_figure(detections: list[dict] | Sequence[list[dict]], annotations: Annotations,
                       images_dir: str | Path, image_ids: Sequence[int], score: float = 0.5,
                       show_ground_truth: bool = False, label: str | Sequence[str] = "predictions",
                       dpi: int = DPI) -> Figure:
    """Detections with score >= `score` drawn over each image (mask tint, box, 'name score'), one row
    per detections list (e.g. teacher and student: the paper's Fig. 5), one column per image; with
    `show_ground_truth` a last row shows the annotations."""
    runs = [detections] if not detections or isinstance(detections[0], dict) else list(detections)
    names = [label] if isinstance(label, str) else list(label)
    if len(names) != len(runs):
        raise InputError(f"{len(names)} labels for {len(runs)} detections files")
    if not 0 <= score <= 1:
        raise InputError(f"--score-threshold must be in [0, 1], got {score}")
    if not image_ids:
        raise InputError(f"{annotations.path} has no images")
    rows = len(runs) + (1 if show_ground_truth else 0)
    n = len(image_ids)
    fig = _new_figure(PREDICTION_PANEL_IN * n, prediction_row_height(annotations, image_ids) * rows + 0.3, dpi)
    axes = np.array(fig.subplots(rows, n, squeeze=False))
    for j, image_id in enumerate(image_ids):
        path = annotations.image_file(image_id, images_dir)
        image = load_image(path, record=f"image {image_id}").permute(1, 2, 0).numpy()
        info = annotations.images[image_id]
        if image.shape[:2] != (info["height"], info["width"]):
            raise InputError(f"image is {image.shape[1]}x{image.shape[0]}, the annotations say "
                             f"{info['width']}x{info['height']}", path=path, record=f"image {image_id}")
        for r, (dets_all, name) in enumerate(zip(runs, names)):
            dets = sorted((d for d in dets_all if d["image_id"] == image_id and d["score"] >= score),
                          key=lambda d: d["score"])  # best drawn last, on top
            _draw_instances(axes[r, j], image, dets, annotations, show_scores=True)
            axes[r, j].set_title(f"{name}: image {image_id} ({len(dets)} >= {score:g})", fontsize=7)
        if show_ground_truth:
            gt = [{**a, "score": 1.0} for a in annotations.anns_by_image.get(image_id, [])]
            _draw_instances(axes[-1, j], image, gt, annotations, show_scores=False)
            axes[-1, j].set_title(f"ground truth ({len(gt)})", fontsize=7)
    return fig


# ---------------------------------------------------------------- one call per `slsd plot KIND`


def write_reliability(calibrations: Sequence[Path], labels: Sequence[str] | None, out: Path, force: bool = False,
                      dpi: int = DPI) -> tuple[Path, Path]:
    """`slsd plot reliability`: read, draw, save (outputs checked before any reading)."""
    check_figure_outputs(out, force)
    names = list(labels) if labels else default_labels(calibrations)
    figure = reliability_figure([read_calibration(p) for p in calibrations], names, dpi=dpi)
    return save_figure(figure, out, force)


def write_ap_vs_frequency(metrics: Sequence[Path], annotations: Path, out: Path, iou_type: str = "segm",
                          labels: Sequence[str] | None = None, title: str | None = None, force: bool = False,
                          dpi: int = DPI) -> tuple[Path, Path]:
    """`slsd plot ap-vs-frequency` with one or two metrics files."""
    from slsd_cli.data.lvis import load_annotations

    check_figure_outputs(out, force)
    if not 1 <= len(metrics) <= 2:
        raise InputError(f"ap-vs-frequency takes one or two metrics files, got {len(metrics)}")
    names = list(labels) if labels else default_labels(metrics)
    figure = ap_vs_frequency_figure([read_metrics(m) for m in metrics], load_annotations(annotations), iou_type,
                                    metrics_path=list(metrics), title=title, labels=names, dpi=dpi)
    return save_figure(figure, out, force)


def write_label_efficiency(metrics: Sequence[Path], out: Path, methods: Sequence[str] | None = None,
                           fractions: Sequence[float] | None = None, iou_type: str = "segm", force: bool = False,
                           dpi: int = DPI) -> tuple[Path, Path]:
    """`slsd plot label-efficiency`."""
    check_figure_outputs(out, force)
    runs = label_efficiency_runs(metrics, methods, fractions, iou_type)
    return save_figure(label_efficiency_figure(runs, iou_type, dpi=dpi), out, force)


def write_predictions(detections: Sequence[Path], annotations: Path, images: Path, out: Path,
                      ids: Sequence[int] | None = None, score: float = 0.5, max_images: int = 4,
                      ground_truth: bool = False, labels: Sequence[str] | None = None, force: bool = False,
                      dpi: int = DPI) -> tuple[Path, Path]:
    """`slsd plot predictions` with one or two detections files (one row each)."""
    from slsd_cli.data.lvis import load_annotations

    check_figure_outputs(out, force)
    if not 1 <= len(detections) <= 2:
        raise InputError(f"predictions takes one or two detections files, got {len(detections)}")
    names = list(labels) if labels else default_labels(detections)
    anns = load_annotations(annotations)
    runs = [read_detections(d, anns) for d in detections]
    chosen = choose_images([d for run in runs for d in run], anns, ids, score, max_images)
    figure = predictions_figure(runs, anns, images, chosen, score=score, show_ground_truth=ground_truth,
                                label=names, dpi=dpi)
    return save_figure(figure, out, force)
