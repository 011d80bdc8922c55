"""`slsd predict`: a trained run over any images (folders, globs, image files, image-list jsons) ->
a results json (RLE masks, the records `slsd eval` writes for the same images) + `OUT.images.json`
(the images and the model's categories), optionally one rendered PNG per image.

`run_predict(PredictConfig(...))` checks every input and output, predicts through a `Predictor`
(sharded under torchrun, `slsd_cli.inference.sharded.predict_to_results`) and renders on rank 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slsd_cli import distributed
from slsd_cli.data.lvis import Annotations
from slsd_cli.errors import InputError
from slsd_cli.inference.predictor import Predictor
from slsd_cli.inference.sharded import predict_to_results
from slsd_cli.io import atomic_path, read_json


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def collect_images(sources: list[str], images_dir: str | Path | None = None) -> list[dict]:
    """Image records {"id", "file_name" (absolute path), "height", "width"} from folders, glob
    patterns, image files and image-list jsons (a json list of paths, or an LVIS/COCO-style
    {"images": [{"id", "file_name" | "coco_url"}]} whose ids are kept; relative names resolve
    against `images_dir`, default the json's folder). Other images get ids from their file names
    when every stem is a distinct integer (COCO's 000000039769.jpg -> 39769), else 1..N in path order."""
    import glob as globbing

    from PIL import Image, UnidentifiedImageError

    from slsd_cli.data.lvis import image_file_name

    given: list[tuple[int | None, Path]] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not files:
                raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder", path=path)
            given += [(None, f) for f in files]
        elif path.suffix.lower() == ".json" and path.is_file():
            data = read_json(path)
            base = Path(images_dir) if images_dir is not None else path.parent
            if isinstance(data, dict) and isinstance(data.get("images"), list):
                for i, img in enumerate(data["images"]):
                    if not isinstance(img, dict) or not isinstance(img.get("id"), int):
                        raise InputError("each image needs an integer 'id'", path=path, record=f"images[{i}]")
                    given.append((img["id"], base / image_file_name(img)))
            elif isinstance(data, list) and all(isinstance(x, str) for x in data):
                given += [(None, base / x) for x in data]
            else:
                raise InputError("an image list is a json list of paths or {\"images\": [{\"id\", \"file_name\"}]}",
                                 path=path)
        elif path.is_file():
            given.append((None, path))
        else:
            matches = sorted(Path(m) for m in globbing.glob(source, recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                raise InputError("no such image, folder, image-list json or matching glob", path=source)
            given += [(None, f) for f in files]
    if any(i is None for i, _ in given):
        if any(i is not None for i, _ in given):
            raise InputError("mix an image-list json with ids and other image sources: give one or the other")
        stems = [p.stem for _, p in given]
        numeric = all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems)
        given = [(int(p.stem) if numeric else k + 1, p) for k, (_, p) in enumerate(given)]
    records, seen = [], set()
    for image_id, path in given:
        if image_id in seen:
            raise InputError(f"image id {image_id} given twice", path=path)
        seen.add(image_id)
        try:
            with Image.open(path) as img:  # the header only
                width, height = img.size
        except FileNotFoundError:
            raise InputError("image file not found", path=path, record=f"image id {image_id}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"unreadable image ({exc})", path=path, record=f"image id {image_id}") from None
        records.append({"id": int(image_id), "file_name": str(path.resolve()), "height": int(height),
                        "width": int(width)})
    return sorted(records, key=lambda r: r["id"])


def images_annotations(records: list[dict], categories: list[dict], path: str | Path) -> Annotations:
    """An images-only dataset (no ground truth) over `records`, with the model's categories."""
    cats = [{k: v for k, v in c.items() if k in ("id", "name", "frequency", "image_count")} for c in categories]
    for c in cats:
        c.setdefault("name", str(c["id"]))
    return Annotations(path=Path(path), data={"images": records, "categories": cats, "annotations": []},
                       protocol="coco")


def predict_images(predictor, sources: list[str], out_path: str | Path, *, images_dir: str | Path | None = None,
                   batch_size: int = 1, max_dets: int = 300, score_threshold: float | None = None,
                   num_workers: int = 0) -> tuple[Path, Path]:
    """`slsd predict`: a `Predictor` over any images -> `out_path` (results json, sharded under
    torchrun) and `OUT.images.json` beside it (the image ids, absolute file names and sizes, and
    the categories: an images-only dataset json that `slsd plot predictions` and `slsd eval`-side
    tools read). -> (results path, images json path)."""
    from slsd_cli.io import atomic_write_json

    out_path = Path(out_path)
    index_path = images_index_path(out_path)
    records = collect_images(sources, images_dir)
    ann = images_annotations(records, predictor.categories, index_path)
    if distributed.is_main():
        atomic_write_json(index_path, {"info": {"description": "slsd predict images"}, "images": records,
                                       "categories": ann.categories, "annotations": []}, indent=1)
    distributed.barrier()
    predict_to_results(predictor, ann, Path("/"), out_path, batch_size=batch_size, max_dets=max_dets,
                       num_workers=num_workers, score_threshold=score_threshold, description="predict")
    return out_path, index_path


def images_index_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.images.json")


def render_predictions(results_path: str | Path, index_path: str | Path, out_dir: str | Path, *,
                       score: float = 0.5, force: bool = False) -> int:
    """One PNG per image (masks, boxes, 'name score' of detections >= score) into `out_dir`,
    named after the image file. -> the number written."""
    from slsd_cli import plots
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.io import check_output

    ann = load_annotations(index_path, require_annotations=False)
    dets = plots.read_detections(results_path, ann)
    out_dir = Path(out_dir)
    names = [f"{Path(ann.images[i]['file_name']).stem}_{i}.png" for i in ann.image_ids]
    for name in names:
        check_output(out_dir / name, force)
    for image_id, name in zip(ann.image_ids, names):
        fig = plots.predictions_figure(dets, ann, Path("/"), [image_id], score=score, label="predict")
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


def run_predict(cfg: PredictConfig) -> dict[str, Any] | None:
    """Check the inputs and outputs, predict (sharded under torchrun), render on rank 0.
    -> {"results", "images_index", "drawings", "predict_s", "render_s"} on rank 0, None elsewhere."""
    from slsd_cli.io import check_output

    started = time.perf_counter()
    if not cfg.images:
        raise InputError("give at least one image folder, glob, image file or image-list json")
    if cfg.score is not None and not 0.0 <= cfg.score <= 1.0:
        raise InputError(f"--score must be in [0, 1], got {cfg.score}")
    if not 0.0 <= cfg.render_score <= 1.0:
        raise InputError(f"--render-score must be in [0, 1], got {cfg.render_score}")
    if cfg.max_dets < 1 or cfg.batch_size < 1 or cfg.workers < 0:
        raise InputError("--max-dets and --batch-size must be >= 1, --workers >= 0")
    index_path = images_index_path(cfg.out)
    check_output(cfg.out, cfg.force)
    check_output(index_path, cfg.force)
    with distributed.session(cfg.device) as dist:
        predictor = Predictor.from_run(cfg.checkpoint, cfg.model, device=dist.device, image_size=cfg.image_size,
                                       amp=cfg.amp)
        results, index = predict_images(predictor, list(cfg.images), cfg.out, images_dir=cfg.images_dir,
                                                  batch_size=cfg.batch_size, max_dets=cfg.max_dets,
                                                  score_threshold=cfg.score, num_workers=cfg.workers)
        if not dist.is_main:
            return None
    predicted = time.perf_counter()
    drawings = 0
    if cfg.render is not None:
        drawings = render_predictions(results, index, cfg.render, score=cfg.render_score, force=cfg.force)
    return {"results": results, "images_index": index, "drawings": drawings, "predict_s": predicted - started,
            "render_s": time.perf_counter() - predicted}
