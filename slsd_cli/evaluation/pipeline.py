"""`slsd eval` as one library call: `run_eval(EvalConfig(...))`.

`EvalConfig` holds the command's options and checks their combinations when it is made (the one
place; an `InputError` names the option). `run_eval` scores a detections file read in place (no
torch, no process group), or runs a detector over the annotations' images first, sharded under
torchrun inside one `distributed.session()`; then it writes metrics.json (with --checkpoint,
detections.json and metrics.json are one set, staged and renamed into place together: `io.FileSet`).
The numbers themselves are `slsd_cli.evaluation.metrics.evaluate`'s.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slsd_cli.errors import InputError
from slsd_cli.model.model_config import check_inference_options, inference_options
from slsd_cli.io import FileSet, atomic_write_json, check_output
from slsd_cli.progress import info, warn

DETECTIONS_NAME = "detections.json"
METRICS_NAME = "metrics.json"
PROTOCOLS = ("lvis", "coco")


def check_detections_or_checkpoint(detections: Path | None, checkpoint: Path | None, images: Path | None,
                                   images_are: str) -> None:
    """The source of the detections to score (`slsd eval`, `slsd calibrate`): exactly one of a
    detections file or a detector run, the latter with its image folder (`images_are` says which)."""
    if (detections is None) == (checkpoint is None):
        raise InputError("give exactly one of --detections FILE or --checkpoint RUN (with --images)")
    if checkpoint is not None and images is None:
        raise InputError(f"--checkpoint needs --images (the folder of {images_are})")


def parse_iou_types(value: str | None) -> tuple[str, ...] | None:
    """'bbox', 'segm' or 'bbox,segm' (in the order given, repeats dropped); None: decided by the
    detections (`evaluation.default_iou_types`)."""
    from slsd_cli.evaluation.metrics import IOU_TYPES

    if value is None:
        return None
    types = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not types or any(t not in IOU_TYPES for t in types):
        raise InputError(f"--iou-type must be bbox, segm or bbox,segm, got {value!r}")
    return types


@dataclass(frozen=True)
class EvalConfig:
    """What `slsd eval` was asked for (one field per option; see its `--help`). Checked when made."""

    annotations: Path
    out_dir: Path
    checkpoint: Path | None = None  # a run directory or model.safetensors, run over `images`
    images: Path | None = None
    detections: Path | None = None  # a results json, instead of `checkpoint`
    protocol: str | None = None  # lvis or coco; None: the annotations'
    iou_type: str | None = None  # bbox, segm or bbox,segm; None: both when the detections have masks
    max_dets: int = 300
    model: str = "student"  # a distillation run's student (RUN/) or teacher (RUN/teacher/)
    batch_size: int = 1
    image_size: int | None = None
    workers: int = 0
    amp: str = "auto"
    force: bool = False
    soft_nms: str | None = None  # with checkpoint: none, linear or gaussian (None: the model's test_soft_nms)
    soft_nms_iou: float | None = None
    soft_nms_sigma: float | None = None
    maskness: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The option combinations; an InputError names the first one that is wrong. (`model` is
        checked where a checkpoint is loaded: `run_dir.resolve_model`.)"""
        check_detections_or_checkpoint(self.detections, self.checkpoint, self.images, "the annotations' images")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise InputError(f"--protocol must be lvis or coco, got {self.protocol!r}")
        parse_iou_types(self.iou_type)
        if self.test_options and self.checkpoint is None:
            raise InputError("--soft-nms, --soft-nms-iou, --soft-nms-sigma and --maskness post-process a "
                             "--checkpoint's detections; a --detections file is scored as it is")
        check_inference_options(self.test_options)

    @property
    def test_options(self) -> dict[str, Any]:
        """The model test keys set for this run (`Predictor`'s `test_options`)."""
        return inference_options(self.soft_nms, self.soft_nms_iou, self.soft_nms_sigma, self.maskness)

    @property
    def iou_types(self) -> tuple[str, ...] | None:
        return parse_iou_types(self.iou_type)

    @property
    def detections_out(self) -> Path:
        """Where --checkpoint's detections go."""
        return Path(self.out_dir) / DETECTIONS_NAME

    @property
    def metrics_out(self) -> Path:
        return Path(self.out_dir) / METRICS_NAME


def run_eval(cfg: EvalConfig) -> dict[str, Any] | None:
    """The whole `slsd eval` step. On rank 0 (or alone) -> {"metrics": the metrics.json dict,
    "iou_types": the IoU types scored, "prepare_s": seconds for the annotations (and, with a
    checkpoint, inference), "evaluation_s": seconds for reading, scoring and writing}; None on
    other torchrun ranks."""
    from slsd_cli.evaluation import metrics as evaluation
    from slsd_cli.data import results
    from slsd_cli.data.lvis import load_annotations

    started = time.perf_counter()
    iou_types = cfg.iou_types
    det_out, metrics_out = cfg.detections_out, cfg.metrics_out
    if cfg.checkpoint is not None:
        check_output(det_out, cfg.force)
    check_output(metrics_out, cfg.force)
    outputs = None
    if cfg.detections is not None:  # scoring a file needs neither torch nor a process group
        ann = load_annotations(cfg.annotations)
        source, det_path = str(cfg.detections), Path(cfg.detections)
    else:
        ann, outputs = _predict(cfg)
        if outputs is None:  # not rank 0
            return None
        source, det_path = f"checkpoint:{cfg.checkpoint} ({cfg.model})", outputs.stage(det_out)
    protocol = cfg.protocol or ann.protocol
    inferred = time.perf_counter()
    with outputs if outputs is not None else contextlib.nullcontext():  # commit, or discard on error
        dets = results.read_results(det_path, ann, masks=iou_types is None or "segm" in iou_types)
        if iou_types is None:
            iou_types = evaluation.default_iou_types(dets)
            if iou_types == ("bbox",):
                info("detections carry no masks: evaluating bbox only")
        if not len(dets):
            warn(f"no detections in {det_out if outputs is not None else det_path}: every AP is 0")
        metrics = evaluation.evaluate(ann, dets, protocol=protocol, iou_types=iou_types, max_dets=cfg.max_dets,
                                      path=det_path)
        del dets
        evaluated = time.perf_counter()
        metrics = {**metrics, "annotations": str(cfg.annotations), "source": source}
        atomic_write_json(outputs.stage(metrics_out) if outputs is not None else metrics_out, metrics, indent=1)
    return {"metrics": metrics, "iou_types": iou_types, "prepare_s": inferred - started,
            "evaluation_s": evaluated - inferred}


def _predict(cfg: EvalConfig) -> tuple[Any, FileSet | None]:
    """--checkpoint: the detector's detections.json, staged in the output set (sharded under
    torchrun; rank 0 merges). -> (annotations, the set) on rank 0, (annotations, None) elsewhere."""
    from slsd_cli import distributed
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.inference import sharded as inference
    from slsd_cli.inference.predictor import load_predictor

    det_out = cfg.detections_out
    with distributed.session() as dist:
        ann = load_annotations(cfg.annotations)
        predictor = load_predictor(cfg.checkpoint, cfg.model, dist.device, image_size=cfg.image_size, amp=cfg.amp,
                                   test_options=cfg.test_options)
        if cfg.amp == "auto" and dist.is_main:
            info(predictor.precision_note())
        # detections.json and metrics.json are one set: staged, renamed into place together (io.FileSet)
        outputs = FileSet([det_out, cfg.metrics_out], cfg.force, main=dist.is_main)
        try:
            inference.predict_to_results(predictor, ann, cfg.images, outputs.stage(det_out),
                                         batch_size=cfg.batch_size, max_dets=cfg.max_dets, num_workers=cfg.workers)
        except BaseException:
            if dist.is_main:
                outputs.discard()
            raise
    return ann, outputs if dist.is_main else None


__all__ = ["DETECTIONS_NAME", "METRICS_NAME", "EvalConfig", "check_detections_or_checkpoint", "parse_iou_types",
           "run_eval"]
