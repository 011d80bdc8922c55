"""`slsd eval`: LVIS / COCO AP of a detector run or a detections file."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional

import typer

from slsd_cli.errors import InputError
from slsd_cli.io import FileSet, atomic_write_json, check_output
from slsd_cli.progress import info, warn

DETECTIONS_NAME = "detections.json"
METRICS_NAME = "metrics.json"


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
    force: bool = typer.Option(False, "--force", help="Replace existing outputs."),
) -> None:
    """Score detections with the official LVIS (LVISEval) or COCO (COCOeval) protocol — the same
    numbers, computed much faster — and write metrics.json (with --checkpoint, also the model's
    detections.json). A --detections file is read in place, not copied.

    With --checkpoint, inference runs sharded under torchrun (each rank writes a shard, rank 0
    merges them), e.g. torchrun --nproc_per_node 8 --no-python slsd eval ...

    Example: slsd eval --annotations val.json --checkpoint runs/student --images images --out-dir runs/student/eval
    """
    from slsd_cli import evaluation, results
    from slsd_cli.data.lvis import load_annotations

    started = time.perf_counter()
    if (detections is None) == (checkpoint is None):
        raise InputError("give exactly one of --detections FILE or --checkpoint RUN (with --images)")
    if checkpoint is not None and images is None:
        raise InputError("--checkpoint needs --images (the folder of the annotations' images)")
    if protocol is not None and protocol not in ("lvis", "coco"):
        raise InputError(f"--protocol must be lvis or coco, got {protocol!r}")
    iou_types = _parse_iou_types(iou_type)
    det_out, metrics_out = out_dir / DETECTIONS_NAME, out_dir / METRICS_NAME
    if checkpoint is not None:
        check_output(det_out, force)
    check_output(metrics_out, force)
    if detections is not None:  # scoring a file needs neither torch nor a process group
        ann = load_annotations(annotations)
        source, det_path = str(detections), detections
    else:
        from slsd_cli import distributed, inference

        with distributed.session() as dist:
            ann = load_annotations(annotations)
            predictor = inference.load_predictor(checkpoint, model, dist.device, image_size=image_size, amp=amp)
            # detections.json and metrics.json are one set: staged, renamed into place together (io.FileSet)
            outputs = FileSet([det_out, metrics_out], force, main=dist.is_main)
            try:
                inference.predict_to_results(predictor, ann, images, outputs.stage(det_out), batch_size=batch_size,
                                             max_dets=max_dets, num_workers=workers)
            except BaseException:
                if dist.is_main:
                    outputs.discard()
                raise
        if not dist.is_main:
            return
        source, det_path = f"checkpoint:{checkpoint} ({model})", outputs.stage(det_out)
    protocol = protocol or ann.protocol
    inferred = time.perf_counter()
    with outputs if checkpoint is not None else contextlib.nullcontext():  # commit, or discard on error
        dets = results.read_results(det_path, ann, masks=iou_types is None or "segm" in iou_types)
        if iou_types is None:
            iou_types = evaluation.default_iou_types(dets)
            if iou_types == ("bbox",):
                info("detections carry no masks: evaluating bbox only")
        if not len(dets):
            warn(f"no detections in {det_out if checkpoint is not None else det_path}: every AP is 0")
        metrics = evaluation.evaluate(ann, dets, protocol=protocol, iou_types=iou_types, max_dets=max_dets,
                                      path=det_path)
        del dets
        evaluated = time.perf_counter()
        metrics = {**metrics, "annotations": str(annotations), "source": source}
        atomic_write_json(outputs.stage(metrics_out) if checkpoint is not None else metrics_out, metrics,
                          indent=1)
    if metrics["num_detections_over_max_dets"]:
        info(f"kept each image's top {max_dets} detections by score: "
             f"{metrics['num_detections_over_max_dets']:,} of "
             f"{metrics['num_detections'] + metrics['num_detections_over_max_dets']:,} dropped (LVIS rule)")
    print_metrics(metrics, iou_types)
    info(f"time: {'inference' if checkpoint is not None else 'setup'} {inferred - started:.1f} s, "
         f"evaluation {evaluated - inferred:.1f} s -> {metrics_out}")


def _parse_iou_types(value: str | None) -> tuple[str, ...] | None:
    from slsd_cli import evaluation

    if value is None:
        return None
    types = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not types or any(t not in evaluation.IOU_TYPES for t in types):
        raise InputError(f"--iou-type must be bbox, segm or bbox,segm, got {value!r}")
    return types


def _fmt(value: float) -> str:
    return "-" if value < 0 else f"{100 * value:.2f}"


def print_metrics(metrics: dict, iou_types: tuple[str, ...]) -> None:
    """A rich table: one row per summary number, one column per IoU type (AP in %, '-' = undefined)."""
    from rich.console import Console
    from rich.table import Table

    from slsd_cli import evaluation

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
