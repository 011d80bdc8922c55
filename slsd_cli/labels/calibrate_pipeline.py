"""`slsd calibrate` as one library call: `run_calibrate(CalibrateConfig(...))`.

`CalibrateConfig` holds the command's options and checks their combinations when it is made (the
one place; an `InputError` names the option). `run_calibrate` reads a detections file in place (no
torch, no process group) or runs a detector over the held-out images, sharded under torchrun inside
one `distributed.session()`, then computes Eq. 4 (`labels.calibration.calibrate_detections`) and
writes calibration.json on rank 0. The label math stays in `labels/`; this module only wires it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slsd_cli.errors import InputError
from slsd_cli.io import check_output
from slsd_cli.labels.calibration import calibrate_detections, write_calibration
from slsd_cli.labels.delta_estimate import DEFAULT_ESTIMATOR, DEFAULT_K, DEFAULT_SUPPORT, DeltaEstimator
from slsd_cli.data.results import Detections, from_records

if TYPE_CHECKING:
    from slsd_cli.data.lvis import Annotations


@dataclass(frozen=True)
class CalibrateConfig:
    """What `slsd calibrate` was asked for (one field per option; see its `--help`). Checked when made."""

    annotations: Path
    out: Path
    detections: Path | None = None  # a results json, or
    checkpoint: Path | None = None  # an slsd detector run over `images`
    images: Path | None = None
    bins: int = 10
    iou: float = 0.5
    iou_type: str = "bbox"
    model: str = "student"  # with `checkpoint`: a run's student or teacher
    image_size: int | None = None
    batch_size: int = 2
    amp: str = "auto"
    estimator: str = DEFAULT_ESTIMATOR  # Δ per class: shrink (toward its r/c/f group) | raw (Eq. 4 as measured)
    shrink_k: float = DEFAULT_K
    shrink_support: str = DEFAULT_SUPPORT
    force: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The option combinations; an InputError names the first one that is wrong."""
        from slsd_cli.evaluation.pipeline import check_detections_or_checkpoint

        check_detections_or_checkpoint(self.detections, self.checkpoint, self.images, "the held-out images")
        if self.iou <= 0:
            raise InputError(f"--iou must be > 0, got {self.iou}")
        if self.model not in ("student", "teacher"):
            raise InputError(f"--model must be student or teacher, got {self.model!r}")
        if self.iou_type not in ("bbox", "segm"):
            raise InputError(f"--iou-type must be bbox or segm, got {self.iou_type!r}")
        self.delta_estimator()

    def delta_estimator(self) -> DeltaEstimator:
        """The estimator of per-class Δ (an InputError names a bad option)."""
        return DeltaEstimator(self.estimator, self.shrink_k, self.shrink_support)


def run_calibrate(cfg: CalibrateConfig) -> dict | None:
    """The whole `slsd calibrate` step: read the detections (a file, without torch), or run the
    detector sharded under torchrun inside one `distributed.session()` (every rank gets the
    detections), then compute and write `cfg.out` on rank 0. -> {"calibration": what was written,
    "annotations_s", "detections_s", "compute_s": seconds of each stage} on rank 0, None elsewhere."""
    from slsd_cli.data import results
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.progress import warn

    started = time.perf_counter()
    check_output(cfg.out, cfg.force)
    ann = load_annotations(cfg.annotations)
    loaded = time.perf_counter()
    if cfg.detections is not None:
        dets = results.read_results(cfg.detections, ann, masks=cfg.iou_type == "segm")  # no torch on this path
        source = str(cfg.detections)
    else:
        from slsd_cli import distributed

        with distributed.session() as dist:
            dets = _checkpoint_detections(cfg, ann, dist.device)
        if not dist.is_main:
            return None
        source = f"checkpoint:{cfg.checkpoint} ({cfg.model})"
    read = time.perf_counter()
    if len(dets) == 0:
        warn("no detections: every class gets Delta = 0 and ECE = 0 (an all-zero calibration)")
    result = calibrate_detections(dets, ann, bins=cfg.bins, iou=cfg.iou, iou_type=cfg.iou_type,
                                  estimator=cfg.delta_estimator())
    result = {**result, "annotations": str(cfg.annotations), "source": source}
    write_calibration(cfg.out, result, force=cfg.force)
    return {"calibration": result, "annotations_s": loaded - started, "detections_s": read - loaded,
            "compute_s": time.perf_counter() - read}


def _checkpoint_detections(cfg: CalibrateConfig, ann: "Annotations", device) -> Detections:
    """Detections of an slsd detector run over the annotations' images (slsd_cli.inference.sharded), its
    temporaries in a scratch folder beside `cfg.out`."""
    from slsd_cli.inference import sharded as inference

    records = inference.predict_results(cfg.checkpoint, ann, cfg.images, batch_size=cfg.batch_size,
                                        image_size=cfg.image_size, model_kind=cfg.model, device=device, amp=cfg.amp,
                                        output=cfg.out)
    return from_records(records, ann, f"checkpoint:{cfg.checkpoint}", masks=cfg.iou_type == "segm")
