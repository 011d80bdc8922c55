"""Sharded detector inference -> a results json (LVIS/COCO results format, RLE masks).

Under torchrun each rank predicts its contiguous block of the images (`shard_indices`) and streams
its results, one json line per detection, into `OUT.rank{r}.jsonl` (written atomically). After a
barrier rank 0 concatenates the shards, in rank order, into `OUT` (a json list, written atomically,
line by line: detections are never gathered in memory) and removes them. Because the blocks are
contiguous and in image-id order, the merged file is the one a single process writes.

`predict_to_results(predictor_or_model, annotations, images_dir, out_path, ...)` writes the results
of a `slsd_cli.predictor.Predictor` (or of a bare detector, wrapped in one: the same padding,
threshold and precision as every other caller); `load_model` resolves a run dir (student or
teacher); `predict_results` does both and returns the detections (for `slsd calibrate --checkpoint`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch

from slsd_cli import distributed
from slsd_cli.data.lvis import Annotations
from slsd_cli.errors import InputError, worker_errors
from slsd_cli.results import write_results
from slsd_cli.io import atomic_path, read_json, remove_leftovers, scratch_dir

MODEL_KINDS = ("student", "teacher")


def resolve_checkpoint(run: str | Path, kind: str = "student") -> Path:
    """The model directory of a run (the layout: `slsd_cli.run_dir`): `RUN` itself (a teacher run,
    or a distillation run's student, its default export), or `RUN/teacher` for a distillation
    run's teacher. A path to a model.safetensors / model.json file is used as is."""
    from slsd_cli import run_dir as runs

    run = Path(run)
    weights = runs.MODEL_WEIGHTS
    if kind not in MODEL_KINDS:
        raise InputError(f"--model must be student or teacher, got {kind!r}")
    if run.is_file():
        if kind == "teacher":
            raise InputError(f"--model teacher needs a run directory (RUN/{runs.TEACHER_DIR}/{weights})", path=run)
        return run
    if not run.is_dir():
        raise InputError(f"checkpoint not found (expected a run directory or {weights})", path=run)
    if kind == "teacher":
        teacher = runs.teacher_dir(run)
        if (teacher / weights).is_file():
            return teacher
        if (run / weights).is_file() and not teacher.exists():
            # a teacher run (slsd train-teacher) holds its model at the top level
            return run
        raise InputError(f"no teacher model here (expected RUN/{runs.TEACHER_DIR}/{weights})", path=run)
    if not (run / weights).is_file():
        raise InputError(f"no {weights} in this run directory", path=run)
    return run


def load_model(run: str | Path, kind: str = "student", device: str | torch.device = "cpu"):
    """-> (model in eval mode on `device`, meta) of a run's student (default) or teacher."""
    from slsd_cli.model.weights import load_detector

    return load_detector(resolve_checkpoint(run, kind), device)


def load_predictor(run: str | Path, kind: str = "student", device: str | torch.device | None = None,
                   image_size: int | None = None, amp: str = "auto"):
    """A `Predictor` for a run's student (default) or teacher."""
    from slsd_cli.predictor import Predictor

    return Predictor.from_run(run, kind, device=device, image_size=image_size, amp=amp)


def shard_path(out_path: str | Path, rank: int) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.name}.rank{rank}.jsonl")


def _images_only(annotations: Annotations) -> Annotations:
    """The same images without ground truth, so the dataset does not rasterise masks it won't use."""
    return Annotations(path=annotations.path, data={**annotations.data, "annotations": []},
                       protocol=annotations.protocol)


def _top_by_score(det: dict, max_dets: int) -> dict:
    scores = det["scores"]
    if scores.numel() <= max_dets:
        return det
    keep = torch.sort(scores, descending=True, stable=True).indices[:max_dets]
    return {k: (v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == scores.shape[0] else v)
            for k, v in det.items()}


def predict_to_results(model, annotations: Annotations, images_dir: str | Path, out_path: str | Path, *,
                       image_size: int | None = None, batch_size: int = 1, max_dets: int = 300,
                       with_probs: bool = False, category_ids: list[int] | None = None, num_workers: int = 0,
                       description: str = "inference", score_threshold: float | None = None,
                       amp: str | None = None) -> Path:
    """Run a `Predictor` (or a detector, wrapped in one) over every image of `annotations` (sharded
    over torchrun ranks) and write the detections to `out_path` (json list, results format, masks as
    compressed RLE; each image's top `max_dets` by score). Every rank returns `out_path` once the
    merged file exists.

    image_size / amp: override the predictor's (for a bare model: default the model's image_size,
    amp "auto"). category_ids: the dataset category id of each model class (contiguous order);
    default the predictor's, else `annotations.category_ids`. A class id absent from the
    annotations is an InputError. score_threshold: default the model's test_score_threshold.
    """
    from slsd_cli.data.batching import collate
    from slsd_cli.data.dataset import InstanceDataset
    from slsd_cli.model.postprocess import to_results
    from slsd_cli.predictor import Predictor
    from slsd_cli.progress import progress

    out_path = Path(out_path)
    images_dir = Path(images_dir)
    if batch_size < 1 or max_dets < 1 or (image_size is not None and image_size < 1):
        raise InputError(f"batch size, max dets and image size must be positive "
                         f"(got {batch_size}, {max_dets}, {image_size})")
    if isinstance(model, Predictor):
        predictor = model.with_options(image_size=image_size, amp=amp, category_ids=category_ids)
    else:
        predictor = Predictor(model, annotations.category_ids if category_ids is None else category_ids,
                              image_size=image_size, amp=amp or "auto")
    category_ids = predictor.category_ids
    unknown = [c for c in category_ids if c not in annotations.category_index]
    if unknown:
        raise InputError(f"the model's category id {unknown[0]} is not in the annotations "
                         f"({len(unknown)} such ids)", path=annotations.path)
    if not images_dir.is_dir():
        raise InputError("image folder not found", path=images_dir)
    image_ids = annotations.image_ids
    # every rank checks every file, so a missing image fails all ranks alike (no rank left waiting)
    for image_id in image_ids:
        if not annotations.image_file(image_id, images_dir).is_file():
            raise InputError("image file not found", path=annotations.image_file(image_id, images_dir),
                             record=f"image id {image_id}")

    rank = distributed.rank()
    world = distributed.world_size()
    mine = [image_ids[i] for i in distributed.shard_indices(len(image_ids))]
    dataset = InstanceDataset(_images_only(annotations), images_dir, predictor.transform(), image_ids=mine)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=partial(collate, size_divisibility=32))
    shard = shard_path(out_path, rank)
    if distributed.is_main():  # shards a killed run left behind
        remove_leftovers(out_path.parent, f"{out_path.name}.rank*.jsonl", f".{out_path.name}.rank*.jsonl.*.tmp")
    distributed.barrier()
    with atomic_path(shard) as tmp, open(tmp, "w", encoding="utf-8") as handle, progress() as bar:
        task = bar.add_task(description, total=len(image_ids), status="")
        count = 0
        for batch in worker_errors(loader):
            dets = predictor.predict(batch.images, batch.image_sizes, score_threshold=score_threshold)
            for det, image_id, scale, orig_size in zip(dets, batch.image_ids, batch.scales, batch.orig_sizes):
                det = _top_by_score(det, max_dets)
                for record in to_results(det, image_id, category_ids, scale, orig_size, with_probs=with_probs):
                    handle.write(json.dumps(record, allow_nan=False) + "\n")
                    count += 1
            # rank 0's bar advances by the work of all ranks, assuming they move at one pace
            bar.update(task, advance=len(batch) * world, status=f"{count:,} detections")
    distributed.barrier()
    if distributed.is_main():
        merge_shards(out_path, world)
    distributed.barrier()
    return out_path


def merge_shards(out_path: str | Path, world_size: int) -> int:
    """Concatenate `OUT.rank{r}.jsonl` (r = 0..world_size-1) into the json list `OUT`, streaming,
    then remove the shards. Returns the number of detections."""
    out_path = Path(out_path)
    shards = [shard_path(out_path, r) for r in range(world_size)]
    for shard in shards:
        if not shard.is_file():
            raise InputError("a rank's detections shard is missing", path=shard)

    def lines():
        for shard in shards:
            with open(shard, encoding="utf-8") as handle:
                for line in handle:
                    line = line.rstrip("\n")
                    if line:
                        yield line

    count = write_results(out_path, lines())
    for shard in shards:
        shard.unlink()
    return count


def predict_results(checkpoint: str | Path, annotations: Annotations, images_dir: str | Path, *,
                    batch_size: int = 1, image_size: int | None = None, max_dets: int = 300,
                    model_kind: str = "student", with_probs: bool = False,
                    device: str | torch.device | None = None, amp: str = "auto",
                    output: str | Path | None = None) -> list[dict[str, Any]]:
    """Load a run's detector and return its detections over the annotations' images (every rank
    gets the full list). Runs sharded under torchrun, through a temporary results file: in a
    scratch folder beside `output` (the caller's output file) when given, else the system's."""
    predictor = load_predictor(checkpoint, model_kind, device, image_size=image_size, amp=amp)
    if output is not None:
        tmp_dir = scratch_dir(output, main=distributed.is_main())
        distributed.barrier()
    else:
        tmp_dir = distributed.broadcast_object(tempfile.mkdtemp(prefix="slsd-predict-") if distributed.is_main()
                                               else None)
    try:
        out = predict_to_results(predictor, annotations, images_dir, Path(tmp_dir) / "detections.json",
                                 batch_size=batch_size, max_dets=max_dets, with_probs=with_probs)
        results = read_json(out)
        distributed.barrier()
    finally:
        if distributed.is_main():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return results


# ---------------------------------------------------------------------- slsd predict: any images

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


__all__ = ["IMAGE_SUFFIXES", "MODEL_KINDS", "collect_images", "images_annotations", "images_index_path",
           "load_model", "load_predictor", "merge_shards", "predict_images", "predict_results", "predict_to_results",
           "render_predictions", "resolve_checkpoint", "shard_path"]
