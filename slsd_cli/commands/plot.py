"""`slsd plot KIND`: the paper's figures (PNG + PDF) from slsd's output files (slsd_cli/plots.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from slsd_cli.errors import InputError
from slsd_cli.progress import info

app = typer.Typer(help="Figures of the paper (PNG and PDF): reliability, ap-vs-frequency, label-efficiency, "
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
                                                                      "[default: the files' parent folder names]."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dpi: int = typer.Option(150, "--dpi", help=DPI_HELP),
) -> None:
    """Reliability diagrams side by side, ECE in each title (the paper's Fig. 3).

    Example: slsd plot reliability teacher/calibration.json student/calibration.json --labels teacher,student --out fig3.png
    """
    from slsd_cli import plots

    plots.check_figure_outputs(out, force)
    names = _split_list(labels, "--labels") or [p.parent.name or p.stem for p in calibrations]
    figure = plots.reliability_figure([plots.read_calibration(p) for p in calibrations], names, dpi=dpi)
    _done(plots.save_figure(figure, out, force))


@app.command("ap-vs-frequency")
def ap_vs_frequency(
    metrics: Path = typer.Argument(..., help="metrics.json (slsd eval)."),
    annotations: Path = typer.Option(..., "--annotations", help="The training json the model saw (instance counts, "
                                                                "frequency groups)."),
    iou_type: str = typer.Option("segm", "--iou-type", help="segm or bbox."),
    title: Optional[str] = typer.Option(None, "--title", help="Figure title."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dpi: int = typer.Option(150, "--dpi", help=DPI_HELP),
) -> None:
    """Per-class AP against training instance count (log x), coloured by r/c/f (the paper's Fig. 4).

    Example: slsd plot ap-vs-frequency runs/student/metrics.json --annotations data/train.json --out fig4.png
    """
    from slsd_cli import plots

    from slsd_cli.data.lvis import load_annotations

    plots.check_figure_outputs(out, force)
    data = plots.read_metrics(metrics)
    figure = plots.ap_vs_frequency_figure(data, load_annotations(annotations), iou_type, metrics_path=metrics,
                                          title=title, dpi=dpi)
    _done(plots.save_figure(figure, out, force))


@app.command("label-efficiency")
def label_efficiency(
    metrics: List[Path] = typer.Argument(..., help="metrics.json files, one per (method, labeled fraction)."),
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

    Example: slsd plot label-efficiency runs/*/metrics.json --out fig2.png
    """
    from slsd_cli import plots

    plots.check_figure_outputs(out, force)
    runs = plots.label_efficiency_runs(metrics, _split_list(methods, "--methods"), _floats(fractions, "--fractions"),
                                       iou_type)
    _done(plots.save_figure(plots.label_efficiency_figure(runs, iou_type, dpi=dpi), out, force))


@app.command("predictions")
def predictions(
    detections: Path = typer.Argument(..., help="detections.json (LVIS/COCO results, RLE masks; slsd eval)."),
    images: Path = typer.Option(..., "--images", help="Image folder (file_name in the annotations is relative to it)."),
    annotations: Path = typer.Option(..., "--annotations", help="The annotations json of these images."),
    ids: Optional[List[str]] = typer.Option(None, "--ids", help="Image ids, comma-separated "
                                            "[default: the first --max-images images with a detection]."),
    score: float = typer.Option(0.5, "--score", help="Draw detections with at least this score."),
    max_images: int = typer.Option(4, "--max-images", help="Images shown when --ids is not given."),
    ground_truth: bool = typer.Option(False, "--gt", help="Add a row with the ground truth."),
    label: str = typer.Option("predictions", "--label", help="Name of the model in the panel titles."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dpi: int = typer.Option(150, "--dpi", help=DPI_HELP),
) -> None:
    """Masks, boxes and class names over images (the paper's Fig. 5).

    Example: slsd plot predictions runs/student/detections.json --images data/images --annotations data/val.json --ids 501,502 --gt --out fig5.png
    """
    from slsd_cli import plots

    from slsd_cli.data.lvis import load_annotations

    plots.check_figure_outputs(out, force)
    anns = load_annotations(annotations)
    dets = plots.read_detections(detections, anns)
    chosen = plots.choose_images(dets, anns, _ints(ids, "--ids"), score, max_images)
    figure = plots.predictions_figure(dets, anns, images, chosen, score=score, show_ground_truth=ground_truth,
                                      label=label, dpi=dpi)
    _done(plots.save_figure(figure, out, force))
