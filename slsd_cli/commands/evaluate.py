"""`slsd eval`: LVIS / COCO AP of a detector run or a detections file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slsd_cli.commands.predict import MASKNESS_HELP, SOFT_NMS_HELP, SOFT_NMS_IOU_HELP, SOFT_NMS_SIGMA_HELP
from slsd_cli.progress import info


def evaluate(
    annotations: Path = typer.Option(..., "--annotations", help="Ground truth: LVIS v1 or COCO instances json."),
    out_dir: Path = typer.Option(..., "--out-dir", "-o",
                                 help="Folder for metrics.json (and, with --checkpoint, detections.json)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="An slsd run directory (or model.safetensors) to run over --images."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (with --checkpoint)."),
    detections: Optional[Path] = typer.Option(
        None, "--detections", help="A detections json (LVIS/COCO results format) instead of --checkpoint."),
    protocol: Optional[str] = typer.Option(
        None, "--protocol", help="lvis or coco (default: detected from the annotations)."),
    iou_type: Optional[str] = typer.Option(
        None, "--iou-type", help="bbox, segm or bbox,segm (default: both when the detections have masks)."),
    max_dets: int = typer.Option(300, "--max-dets", min=1,
                                 help="Detections per image (LVIS: top-k per image; COCO: per image and class)."),
    model: str = typer.Option("student", "--model",
                              help="Of a distillation run: the student (RUN/, default) or the teacher (RUN/teacher)."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Images per forward pass (with --checkpoint)."),
    image_size: Optional[int] = typer.Option(
        None, "--image-size", min=1, help="Test size: longest image edge (default: the model's image_size)."),
    workers: int = typer.Option(0, "--workers", min=0, help="Image-loading worker processes per rank."),
    amp: str = typer.Option("auto", "--amp", help="Inference precision with --checkpoint: auto (bf16 on CUDA, "
                                                  "fp32 on CPU), fp32, bf16 or fp16."),
    soft_nms: Optional[str] = typer.Option(None, "--soft-nms", help=SOFT_NMS_HELP),
    soft_nms_iou: Optional[float] = typer.Option(None, "--soft-nms-iou", help=SOFT_NMS_IOU_HELP),
    soft_nms_sigma: Optional[float] = typer.Option(None, "--soft-nms-sigma", help=SOFT_NMS_SIGMA_HELP),
    maskness: Optional[float] = typer.Option(None, "--maskness", help=MASKNESS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace existing outputs."),
) -> None:
    """Score detections with the official LVIS (LVISEval) or COCO (COCOeval) protocol — the same
    numbers, computed much faster — and write metrics.json (with --checkpoint, also the model's
    detections.json). A --detections file is read in place, not copied.

    With --checkpoint, inference runs sharded under torchrun (each rank writes a shard, rank 0
    merges them), e.g. torchrun --nproc_per_node 8 --no-python slsd eval ...

    With --checkpoint, --soft-nms and --maskness change the post-processing for this run (EVA-02's
    published "sys" numbers need --soft-nms linear --soft-nms-iou 0.6 --maskness 0.5), and --amp
    auto says on one line which precision it chose (fp32 for a converted EVA-02 checkpoint).

    Example: slsd eval --annotations val.json --checkpoint runs/student --images images --out-dir runs/student/eval
    """
    from slsd_cli.evaluation.pipeline import EvalConfig, run_eval

    cfg = EvalConfig(annotations=annotations, out_dir=out_dir, checkpoint=checkpoint, images=images,
                     detections=detections, protocol=protocol, iou_type=iou_type, max_dets=max_dets, model=model,
                     batch_size=batch_size, image_size=image_size, workers=workers, amp=amp, force=force,
                     soft_nms=soft_nms, soft_nms_iou=soft_nms_iou, soft_nms_sigma=soft_nms_sigma, maskness=maskness)
    done = run_eval(cfg)
    if done is None:  # not rank 0
        return
    metrics = done["metrics"]
    if metrics["num_detections_over_max_dets"]:
        info(f"kept each image's top {max_dets} detections by score: "
             f"{metrics['num_detections_over_max_dets']:,} of "
             f"{metrics['num_detections'] + metrics['num_detections_over_max_dets']:,} dropped (LVIS rule)")
    print_metrics(metrics, done["iou_types"])
    info(f"time: {'inference' if checkpoint is not None else 'setup'} {done['prepare_s']:.1f} s, "
         f"evaluation {done['evaluation_s']:.1f} s -> {cfg.metrics_out}")


def _fmt(value: float) -> str:
    return "-" if value < 0 else f"{100 * value:.2f}"


def print_metrics(metrics: dict, iou_types: tuple[str, ...]) -> None:
    """A rich table: one row per summary number, one column per IoU type (AP in %, '-' = undefined)."""
    from rich.console import Console
    from rich.table import Table

    from slsd_cli.evaluation import metrics as evaluation

    protocol, max_dets = metrics["protocol"], metrics["max_dets"]
    table = Table(title=f"{protocol.upper()} AP (%)",
                  caption=f"{metrics['num_images']:,} images, {metrics['num_detections']:,} detections "
                          f"(max {max_dets} per image); - = no ground truth")
    table.add_column("metric")
    for iou_type in iou_types:
        table.add_column(iou_type, justify="right")
    for key in evaluation.summary_keys(protocol, max_dets):
        table.add_row(key, *(_fmt(metrics[t][key]) for t in iou_types))
    Console().print(table)
