"""`slsd predict`: a trained run over any images (folders, globs, image files, image-list jsons) ->
a results json (RLE masks, the records `slsd eval` writes for the same images) + `OUT.images.json`
(the images, their file names relative to its `info.images_dir`, and the model's categories; the
two files are one set), optionally one rendered PNG per image.

`run_predict(PredictConfig(...))` checks every option, image and output location before it writes
anything, predicts through a `Predictor` (sharded under torchrun,
`slsd_cli.inference.sharded.predict_to_results`) and renders on rank 0. The sources are read by
`slsd_cli.inference.image_sources`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slsd_cli import distributed
from slsd_cli.data.lvis import Annotations
from slsd_cli.errors import InputError
from slsd_cli.inference.image_sources import collect_images
from slsd_cli.inference.predictor import Predictor
from slsd_cli.model.model_config import check_inference_options, inference_options
from slsd_cli.inference.sharded import predict_to_results
from slsd_cli.io import FileSet, atomic_path, atomic_write_json
from slsd_cli.progress import info


def images_annotations(records: list[dict], categories: list[dict], path: str | Path) -> Annotations:
    """An images-only dataset (no ground truth) over `records`, with the model's categories."""
    cats = [{k: v for k, v in c.items() if k in ("id", "name", "frequency", "image_count")} for c in categories]
    for c in cats:
        c.setdefault("name", str(c["id"]))
    return Annotations(path=Path(path), data={"images": records, "categories": cats, "annotations": []},
                       protocol="coco")


def relative_to_common_folder(records: list[dict]) -> tuple[Path, list[dict]]:
    """(the images' deepest common folder, the records with file names relative to it): the form
    of an image list everywhere in slsd (names under an image folder, never absolute)."""
    root = Path(os.path.commonpath([str(Path(r["file_name"]).parent) for r in records]))
    return root, [{**r, "file_name": Path(r["file_name"]).relative_to(root).as_posix()} for r in records]


def images_index_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.images.json")


# a drawing's name stays this short, so its temporary (".NAME.<8 random characters>.tmp") fits a 255-byte file name
DRAWING_NAME_BYTES = 200


def drawing_names(records: list[dict]) -> list[str]:
    """One PNG name per image record: its file's stem (cut to fit `DRAWING_NAME_BYTES`) and id."""
    names = []
    for record in records:
        suffix = f"_{record['id']}.png"
        stem = Path(record["file_name"]).stem.encode("utf-8")[:DRAWING_NAME_BYTES - len(suffix)]
        names.append(stem.decode("utf-8", errors="ignore") + suffix)
    return names


def check_render_folder(folder: Path, names: list[str], force: bool) -> None:
    """Refuse a `--render` folder that cannot hold the drawings, before anything is written: an
    existing file in its place or above it, a folder not writable, a drawing already there (without
    --force). Nothing is created."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError("--render must be a folder, and this is a file", path=folder)
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError("--render lies below a file, not a folder", path=folder)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError("--render folder is not writable", path=existing)
    if folder.is_dir() and not force:
        taken = next((folder / n for n in names if (folder / n).exists()), None)
        if taken is not None:
            raise InputError("output exists; pass --force to overwrite it", path=taken)


def render_predictions(results_path: str | Path, index_path: str | Path, out_dir: str | Path, *,
                       score: float = 0.5, force: bool = False) -> int:
    """One PNG per image (masks, boxes, 'name score' of detections >= score) into `out_dir`,
    named after the image file (`drawing_names`). -> the number written."""
    from slsd_cli import plots
    from slsd_cli.data.lvis import load_annotations

    ann = load_annotations(index_path, require_annotations=False)
    images_dir = Path(ann.data.get("info", {}).get("images_dir", Path(index_path).parent))
    dets = plots.read_detections(results_path, ann)
    out_dir = Path(out_dir)
    names = drawing_names([ann.images[i] for i in ann.image_ids])
    check_render_folder(out_dir, names, force)
    for image_id, name in zip(ann.image_ids, names):
        fig = plots.predictions_figure(dets, ann, images_dir, [image_id], score=score, label="predict")
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=fig.dpi, metadata={"Software": None})
    return len(names)


@dataclass
class PredictConfig:
    checkpoint: Path  # a run directory or a model.safetensors
    images: list[str]  # folders, glob patterns, image files or image-list jsons
    out: Path  # results json; OUT.images.json goes beside it
    model: str = "student"  # a distillation run's student (RUN/) or teacher (RUN/teacher/)
    images_dir: Path | None = None  # base of an image-list json's relative names (default: its folder)
    score: float | None = None  # default: the model's test_score_threshold
    max_dets: int = 300
    image_size: int | None = None  # default: the model's
    batch_size: int = 1
    amp: str = "auto"
    render: Path | None = None  # folder for one drawn PNG per image
    render_score: float = 0.5
    workers: int = 0
    device: str = "auto"
    force: bool = False
    soft_nms: str | None = None  # none, linear or gaussian; None: the model's test_soft_nms
    soft_nms_iou: float | None = None
    soft_nms_sigma: float | None = None
    maskness: float | None = None

    @property
    def test_options(self) -> dict[str, Any]:
        return inference_options(self.soft_nms, self.soft_nms_iou, self.soft_nms_sigma, self.maskness)

    def validate(self) -> None:
        """Every option and output location, before anything is read or written."""
        if not self.images:
            raise InputError("give at least one image folder, glob, image file or image-list json")
        if self.score is not None and not 0.0 <= self.score <= 1.0:
            raise InputError(f"--score-threshold must be in [0, 1], got {self.score}")
        if not 0.0 <= self.render_score <= 1.0:
            raise InputError(f"--render-score-threshold must be in [0, 1], got {self.render_score}")
        if self.max_dets < 1 or self.batch_size < 1 or self.workers < 0:
            raise InputError("--max-dets and --batch-size must be >= 1, --workers >= 0")
        check_inference_options(self.test_options)
        for path in (self.out, images_index_path(self.out)):
            if Path(path).is_dir():
                raise InputError("--out must name a results file, and this is a folder", path=path)
        if self.render is not None and Path(self.render).resolve() in (Path(self.out).resolve(),
                                                                       images_index_path(self.out).resolve()):
            raise InputError("--render must be a folder other than the results files", path=self.render)


def run_predict(cfg: PredictConfig) -> dict[str, Any] | None:
    """Check the options, images and every output location, predict (sharded under torchrun) into
    the results json and `OUT.images.json` (one set: both or neither), render on rank 0.
    -> {"results", "images_index", "drawings", "predict_s", "render_s"} on rank 0, None elsewhere."""
    started = time.perf_counter()
    cfg.validate()
    index_path = images_index_path(cfg.out)
    with distributed.session(cfg.device) as dist:
        predictor = Predictor.from_run(cfg.checkpoint, cfg.model, device=dist.device, image_size=cfg.image_size,
                                       amp=cfg.amp, test_options=cfg.test_options)
        records = collect_images(list(cfg.images), cfg.images_dir)  # every rank: all fail alike
        if cfg.render is not None and dist.is_main:
            check_render_folder(cfg.render, drawing_names(records), cfg.force)
        if cfg.amp == "auto" and dist.is_main:
            info(predictor.precision_note())
        root, records = relative_to_common_folder(records)
        outputs = FileSet([cfg.out, index_path], cfg.force, main=dist.is_main)
        try:
            ann = images_annotations(records, predictor.categories, index_path)
            if dist.is_main:
                info_block = {"description": "slsd predict images", "images_dir": str(root)}
                atomic_write_json(outputs.stage(index_path), {"info": info_block, "images": records,
                                                              "categories": ann.categories, "annotations": []},
                                  indent=1)
            predict_to_results(predictor, ann, root, outputs.stage(cfg.out), batch_size=cfg.batch_size,
                               max_dets=cfg.max_dets, num_workers=cfg.workers, score_threshold=cfg.score,
                               description="predict")
        except BaseException:
            if dist.is_main:
                outputs.discard()
            raise
        if not dist.is_main:
            return None
    with outputs:  # both files renamed into place together
        pass
    predicted = time.perf_counter()
    drawings = 0
    if cfg.render is not None:
        drawings = render_predictions(cfg.out, index_path, cfg.render, score=cfg.render_score, force=cfg.force)
    return {"results": cfg.out, "images_index": index_path, "drawings": drawings, "predict_s": predicted - started,
            "render_s": time.perf_counter() - predicted}
