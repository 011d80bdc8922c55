"""`slsd calibrate`: per-class calibration error (CCECE, paper Eq. 4) and ECE of a detector on
held-out data, written to calibration.json for calibration-corrected distillation (Eq. 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slsd_cli.progress import info


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
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Measure per-class calibration (CCECE, Eq. 4) and ECE of a detector on held-out data.

    Delta = sum over confidence bins of (N_b / N) (accuracy_b - confidence_b); negative: over-confident.

    For LVIS, only detections of classes verified on their image (annotated or a listed negative) are judged.

    Example: slsd calibrate --annotations holdout.json --detections runs/teacher/detections.json --out calibration.json
    """
    from slsd_cli.labels.calibrate_pipeline import CalibrateConfig, run_calibrate

    cfg = CalibrateConfig(annotations=annotations, out=out, detections=detections, checkpoint=checkpoint,
                          images=images, bins=bins, iou=iou, iou_type=iou_type, model=model_kind,
                          image_size=image_size, batch_size=batch_size, amp=amp, force=force)
    done = run_calibrate(cfg)
    if done is None:  # not rank 0
        return
    result = done["calibration"]
    deltas = " / ".join(f"{g} " + ("n/a" if (d := result["groups"][g]["mean_delta"]) is None else f"{d:+.4f}")
                        for g in ("r", "c", "f"))  # n/a: no detection of the group judged
    info(f"calibration: {result['judged']:,} of {result['detections']:,} detections judged "
         f"({result['unverified']:,} on unverified classes, {result['ignored']:,} ignored), "
         f"ECE {result['ece']:.4f}; mean Delta {deltas} -> {out}")
    info(f"time: annotations {done['annotations_s']:.1f} s, detections {done['detections_s']:.1f} s, "
         f"compute and write {done['compute_s']:.1f} s")
