"""`slsd calibrate`: per-class calibration error (CCECE, paper Eq. 4) and ECE of a detector on
held-out data, written to calibration.json for calibration-corrected distillation (Eq. 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slsd_cli.labels.delta_estimate import DEFAULT_ESTIMATOR, DEFAULT_K, DEFAULT_SUPPORT
from slsd_cli.progress import info


def describe(estimator: dict) -> str:
    """'shrink k=30 on detections' or 'raw Eq. 4'."""
    if estimator["name"] == "raw":
        return "raw Eq. 4"
    return f"{estimator['name']} k={estimator['k']:g} on {estimator['support']}"


def calibrate(
    annotations: Path = typer.Option(..., "--annotations", help="Held-out LVIS/COCO json (ground truth)."),
    out: Path = typer.Option(..., "--out", help="Output calibration.json."),
    detections: Optional[Path] = typer.Option(
        None, "--detections", help="Detections json (LVIS/COCO results format, e.g. from slsd eval)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="An slsd detector run to run over --images instead of --detections."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (with --checkpoint)."),
    bins: int = typer.Option(10, "--bins", min=1, max=1000, help="Equal-width confidence bins over [0, 1]."),
    iou: float = typer.Option(0.5, "--iou", min=0.0, max=1.0, help="IoU at which a detection matches a ground truth."),
    iou_type: str = typer.Option("bbox", "--iou-type", help="Match boxes (bbox) or masks (segm)."),
    model_kind: str = typer.Option("student", "--model", help="With --checkpoint: a run's student or teacher."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=16,
                                             help="With --checkpoint: test size (default: the model's)."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Images per batch (with --checkpoint)."),
    amp: str = typer.Option("auto", "--amp", help="Inference precision with --checkpoint: auto (bf16 on CUDA, "
                                                  "fp32 on CPU), fp32, bf16 or fp16."),
    estimator: str = typer.Option(
        DEFAULT_ESTIMATOR, "--estimator", help="Per-class Delta that Eq. 5 reads: shrink (toward the pooled Delta "
        "of the class's r/c/f group, by its support; a class with no ground-truth instance in the data gets its "
        "group's Delta) or raw (Eq. 4 as measured: a class absent from the data is over-confident by its mean "
        "score)."),
    shrink_k: float = typer.Option(
        DEFAULT_K, "--shrink-k", min=0.0, help="shrink: the support at which a class's own Delta and its group's "
        "count equally (0: keep every supported class's own Delta)."),
    shrink_support: str = typer.Option(
        DEFAULT_SUPPORT, "--shrink-support", help="shrink: what a class's support counts: instances (its ground-truth "
        "instances in the data) or detections (its judged detections)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Measure per-class calibration (CCECE, Eq. 4) and ECE of a detector on held-out data.

    Delta = sum over confidence bins of (N_b / N) (accuracy_b - confidence_b); negative: over-confident.

    For LVIS, only detections of classes verified on their image (annotated or a listed negative) are judged.

    By default each class's Delta is shrunk toward its r/c/f group's: (n Delta + k Delta_group) / (n + k), n its
    judged detections (0 without a ground-truth instance in the data: its group's Delta); each class's entry
    gives its raw Delta, support and status (estimated, shrunk or unknown).

    Example: slsd calibrate --annotations holdout.json --detections runs/teacher/detections.json --out calibration.json
    """
    from slsd_cli.labels.calibrate_pipeline import CalibrateConfig, run_calibrate

    cfg = CalibrateConfig(annotations=annotations, out=out, detections=detections, checkpoint=checkpoint,
                          images=images, bins=bins, iou=iou, iou_type=iou_type, model=model_kind,
                          image_size=image_size, batch_size=batch_size, amp=amp, estimator=estimator,
                          shrink_k=shrink_k, shrink_support=shrink_support, force=force)
    done = run_calibrate(cfg)
    if done is None:  # not rank 0
        return
    result = done["calibration"]
    deltas = " / ".join(f"{g} " + ("n/a" if (d := result["groups"][g]["mean_delta"]) is None else f"{d:+.4f}")
                        for g in ("r", "c", "f"))  # n/a: no class of the group with a measured Delta
    groups = result["groups"]
    status = ", ".join(f"{sum(groups[g][kind] for g in groups)} {kind}" for kind in ("estimated", "shrunk", "unknown"))
    info(f"calibration: {result['judged']:,} of {result['detections']:,} detections judged "
         f"({result['unverified']:,} on unverified classes, {result['ignored']:,} ignored), "
         f"ECE {result['ece']:.4f}; mean Delta {deltas} ({describe(result['estimator'])}: classes {status}) -> {out}")
    info(f"time: annotations {done['annotations_s']:.1f} s, detections {done['detections_s']:.1f} s, "
         f"compute and write {done['compute_s']:.1f} s")
