"""`slsd calibrate`: per-class calibration error (CCECE, paper Eq. 4) and ECE of a detector on
held-out data, written to calibration.json for calibration-corrected distillation (Eq. 5)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from slsd_cli.errors import InputError
from slsd_cli.io import check_output
from slsd_cli.progress import info, warn


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
    from slsd_cli import results
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.labels import calibration

    started = time.perf_counter()
    if (detections is None) == (checkpoint is None):
        raise InputError("give exactly one of --detections FILE or --checkpoint RUN (with --images)")
    if checkpoint is not None and images is None:
        raise InputError("--checkpoint needs --images (the folder of the held-out images)")
    if iou <= 0:
        raise InputError(f"--iou must be > 0, got {iou}")
    if model_kind not in ("student", "teacher"):
        raise InputError(f"--model must be student or teacher, got {model_kind!r}")
    if iou_type not in ("bbox", "segm"):
        raise InputError(f"--iou-type must be bbox or segm, got {iou_type!r}")
    check_output(out, force)
    ann = load_annotations(annotations)
    loaded = time.perf_counter()
    main_process = True
    if detections is not None:
        dets = results.read_results(detections, ann, masks=iou_type == "segm")  # no torch on this path
        source = str(detections)
    else:  # inference runs sharded under torchrun; every rank gets the detections, rank 0 writes
        from slsd_cli import distributed

        with distributed.session() as dist:
            main_process = dist.is_main
            dets = _run_checkpoint(checkpoint, ann, images, iou_type, batch_size, model_kind, image_size, dist.device,
                                   amp, output=out)
        source = f"checkpoint:{checkpoint} ({model_kind})"
    if not main_process:
        return
    read = time.perf_counter()
    if len(dets) == 0:
        warn("no detections: every class gets Delta = 0 and ECE = 0 (an all-zero calibration)")
    result = calibration.calibrate_detections(dets, ann, bins=bins, iou=iou, iou_type=iou_type)
    result = {**result, "annotations": str(annotations), "source": source}
    calibration.write_calibration(out, result, force=force)
    done = time.perf_counter()
    deltas = " / ".join(f"{g} " + ("n/a" if (d := result["groups"][g]["mean_delta"]) is None else f"{d:+.4f}")
                        for g in ("r", "c", "f"))  # n/a: no detection of the group judged
    info(f"calibration: {result['judged']:,} of {result['detections']:,} detections judged "
         f"({result['unverified']:,} on unverified classes, {result['ignored']:,} ignored), "
         f"ECE {result['ece']:.4f}; mean Delta {deltas} -> {out}")
    info(f"time: annotations {loaded - started:.1f} s, detections {read - loaded:.1f} s, "
         f"compute and write {done - read:.1f} s")


def _run_checkpoint(checkpoint: Path, ann, images: Path, iou_type: str, batch_size: int, model_kind: str,
                    image_size: int | None, device, amp: str = "auto",
                    output: Path | None = None) -> "results.Detections":
    """Detections of an slsd detector run over the annotations' images (slsd_cli.inference)."""
    from slsd_cli import inference, results

    records = inference.predict_results(checkpoint, ann, images, batch_size=batch_size, image_size=image_size,
                                        model_kind=model_kind, device=device, amp=amp,
                                        output=output)  # its temporaries beside the output
    return results.from_records(records, ann, f"checkpoint:{checkpoint}", masks=iou_type == "segm")
