"""`slsd plot KIND`: the paper's figures (PNG + PDF) from slsd's output files. Each command parses its
options and makes one call, `plots.write_<kind>(...)` (slsd_cli/plots.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from slsd_cli.errors import InputError
from slsd_cli.progress import info

app = typer.Typer(rich_markup_mode=None, help="Figures of the paper (PNG and PDF): reliability, ap-vs-frequency, label-efficiency, "
                       "predictions.", no_args_is_help=True)

OUT_HELP = "Output figure; FIG.png and FIG.pdf are written (same stem)."
FORCE_HELP = "Replace existing figures."
DPI_HELP = "PNG resolution (dots per inch)."


def _split_list(values: Optional[List[str]], option: str) -> Optional[list[str]]:
    """'a,b' or repeated options -> ['a', 'b']; None when not given."""
    if not values:
        return None
    items = [item.strip() for value in values for item in value.split(",")]
    if any(not item for item in items):
        raise InputError(f"empty entry in {option} {','.join(values)!r}")
    return items


def _floats(values: Optional[List[str]], option: str) -> Optional[list[float]]:
    items = _split_list(values, option)
    if items is None:
        return None
    try:
        return [float(item) for item in items]
    except ValueError as exc:
        raise InputError(f"{option} takes numbers ({exc})") from None


def _ints(values: Optional[List[str]], option: str) -> Optional[list[int]]:
    items = _split_list(values, option)
    if items is None:
        return None
    try:
        return [int(item) for item in items]
    except ValueError as exc:
        raise InputError(f"{option} takes integer image ids ({exc})") from None


def _done(paths: tuple[Path, Path]) -> None:
    info(f"wrote {paths[0]} and {paths[1]}")


@app.command("reliability")
def reliability(
    calibrations: List[Path] = typer.Argument(..., help="calibration.json files (slsd calibrate), one panel each."),
    labels: Optional[List[str]] = typer.Option(None, "--labels", help="Panel labels, comma-separated "
                                                                      "(default: each file's run folder, e.g. "
                                                                      "teacher for runs/teacher/eval/calibration.json)."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dpi: int = typer.Option(150, "--dpi", help=DPI_HELP),
) -> None:
    """Reliability diagrams side by side, ECE in each title (the paper's Fig. 3).

    Example: slsd plot reliability teacher/calibration.json student/calibration.json --labels teacher,student --out fig3.png
    """
    from slsd_cli import plots

    _done(plots.write_reliability(calibrations, _split_list(labels, "--labels"), out, force, dpi))


@app.command("ap-vs-frequency")
def ap_vs_frequency(
    metrics: List[Path] = typer.Argument(..., help="metrics.json (slsd eval); two files (teacher, student) are "
                                                   "drawn together, the first hollow, the second filled."),
    annotations: Path = typer.Option(..., "--annotations", help="The training json the model saw (instance counts, "
                                                                "frequency groups)."),
    labels: Optional[List[str]] = typer.Option(None, "--labels", help="Run names, comma-separated (default: each "
                                                                      "file's run folder)."),
    iou_type: str = typer.Option("segm", "--iou-type", help="segm or bbox."),
    title: Optional[str] = typer.Option(None, "--title", help="Figure title."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dpi: int = typer.Option(150, "--dpi", help=DPI_HELP),
) -> None:
    """Per-class AP against training instance count (log x), coloured by r/c/f (the paper's Fig. 4).

    Example: slsd plot ap-vs-frequency runs/teacher/eval/metrics.json runs/student/eval/metrics.json --annotations data/train.json --out fig4.png
    """
    from slsd_cli import plots

    _done(plots.write_ap_vs_frequency(metrics, annotations, out, iou_type, _split_list(labels, "--labels"), title,
                                      force, dpi))


@app.command("label-efficiency")
def label_efficiency(
    metrics: List[Path] = typer.Argument(..., help="metrics.json files of `slsd eval`, one per (method, labeled "
                                                   "fraction); each names its method and fraction in top-level "
                                                   "keys 'method' (text) and 'labeled_fraction' (0-1), or see "
                                                   "--methods / --fractions."),
    methods: Optional[List[str]] = typer.Option(None, "--methods", help="Method of each file, comma-separated "
                                                                        "[default: each file's 'method' key]."),
    fractions: Optional[List[str]] = typer.Option(None, "--fractions", help="Labeled fraction of each file, e.g. "
                                                  "0.01,0.05 [default: each file's 'labeled_fraction' key]."),
    iou_type: str = typer.Option("segm", "--iou-type", help="segm or bbox."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dpi: int = typer.Option(150, "--dpi", help=DPI_HELP),
) -> None:
    """AP and APr against the labeled fraction, one line per method (the paper's Fig. 2).

    Input: metrics.json files as `slsd eval` writes them, with two extra top-level keys, e.g.
    {"method": "similarity", "labeled_fraction": 0.05, "segm": {"AP": 0.21, "APr": 0.08, ...}, ...};
    AP values are fractions in [0, 1], -1 = undefined (drawn as a gap). Without the keys, give
    --methods and --fractions in the order of the files.

    Example: slsd plot label-efficiency runs/*/metrics.json --out fig2.png

    Example: slsd plot label-efficiency a/metrics.json b/metrics.json --methods one-hot,similarity --fractions 0.05,0.05 --out fig2.png
    """
    from slsd_cli import plots

    _done(plots.write_label_efficiency(metrics, out, _split_list(methods, "--methods"), _floats(fractions, "--fractions"),
                                       iou_type, force, dpi))


@app.command("predictions")
def predictions(
    detections: List[Path] = typer.Argument(..., help="detections.json (LVIS/COCO results, RLE masks; slsd eval); "
                                                      "two files (teacher, student) give one row each."),
    images: Path = typer.Option(..., "--images", help="Image folder (file_name in the annotations is relative to it)."),
    annotations: Path = typer.Option(..., "--annotations", help="The annotations json of these images."),
    ids: Optional[List[str]] = typer.Option(None, "--ids", help="Image ids, comma-separated "
                                            "(default: the first --max-images images with a detection)."),
    score_threshold: Optional[float] = typer.Option(None, "--score-threshold",
                                                    help="Draw detections with at least this score (default 0.5)."),
    score_alias: Optional[float] = typer.Option(None, "--score", hidden=True, help="Old spelling of --score-threshold."),
    max_images: int = typer.Option(4, "--max-images", help="Images shown when --ids is not given."),
    ground_truth: bool = typer.Option(False, "--gt", help="Add a row with the ground truth."),
    labels: Optional[List[str]] = typer.Option(None, "--labels", help="Row names, comma-separated (default: each "
                                                                      "file's run folder)."),
    label: Optional[str] = typer.Option(None, "--label", hidden=True, help="Old spelling of --labels (one run)."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dpi: int = typer.Option(150, "--dpi", help=DPI_HELP),
) -> None:
    """Masks, boxes and class names over images (the paper's Fig. 5).

    Example: slsd plot predictions runs/teacher/eval/detections.json runs/student/eval/detections.json --images data/images --annotations data/val.json --ids 501,502 --gt --out fig5.png
    """
    from slsd_cli import plots
    from slsd_cli.commands._options import renamed

    names = _split_list(labels, "--labels") or ([label] if label else None)
    score = renamed(score_threshold, score_alias, "--score-threshold", "--score")
    drawn = {} if score is None else {"score": score}  # None: write_predictions' default
    _done(plots.write_predictions(detections, annotations, images, out, _ints(ids, "--ids"), max_images=max_images,
                                  ground_truth=ground_truth, labels=names, force=force, dpi=dpi, **drawn))
