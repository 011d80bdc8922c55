"""Sharded detector inference -> a results json (LVIS/COCO results format, RLE masks).

Under torchrun each rank predicts its contiguous block of the images (`shard_indices`) and streams
its results, one json line per detection, into `OUT.rank{r}.jsonl` (written atomically). After a
barrier rank 0 concatenates the shards, in rank order, into `OUT` (a json list, written atomically,
line by line: detections are never gathered in memory) and removes them. Because the blocks are
contiguous and in image-id order, the merged file is the one a single process writes.

`predict_to_results` takes a model; `load_model` resolves a run dir (student or teacher);
`predict_results` does both and returns the detections (for `slsd calibrate --checkpoint`).
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
from slsd_cli.errors import InputError
from slsd_cli.evaluation import write_results
from slsd_cli.io import atomic_path, read_json

MODEL_KINDS = ("student", "teacher")


def resolve_checkpoint(run: str | Path, kind: str = "student") -> Path:
    """The model directory of a run: `RUN` itself (a teacher run, or a distillation run's student,
    its default export), or `RUN/teacher` for a distillation run's teacher. A path to a
    model.safetensors / model.json file is used as is."""
    run = Path(run)
    if kind not in MODEL_KINDS:
        raise InputError(f"--model must be student or teacher, got {kind!r}")
    if run.is_file():
        if kind == "teacher":
            raise InputError("--model teacher needs a run directory (RUN/teacher/model.safetensors)", path=run)
        return run
    if not run.is_dir():
        raise InputError("checkpoint not found (expected a run directory or model.safetensors)", path=run)
    if kind == "teacher":
        teacher = run / "teacher"
        if (teacher / "model.safetensors").is_file():
            return teacher
        if (run / "model.safetensors").is_file() and not (run / "teacher").exists():
            # a teacher run (slsd train-teacher) holds its model at the top level
            return run
        raise InputError("no teacher model here (expected RUN/teacher/model.safetensors)", path=run)
    if not (run / "model.safetensors").is_file():
        raise InputError("no model.safetensors in this run directory", path=run)
    return run


def load_model(run: str | Path, kind: str = "student", device: str | torch.device = "cpu"):
    """-> (model in eval mode on `device`, meta) of a run's student (default) or teacher."""
    from slsd_cli.model.weights import load_detector

    return load_detector(resolve_checkpoint(run, kind), device)


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
                       image_size: int, batch_size: int = 1, max_dets: int = 300, with_probs: bool = False,
                       category_ids: list[int] | None = None, num_workers: int = 0,
                       description: str = "inference") -> Path:
    """Run `model.predict` over every image of `annotations` (sharded over torchrun ranks) and write
    the detections to `out_path` (json list, results format, masks as compressed RLE; each image's
    top `max_dets` by score). Every rank returns `out_path` once the merged file exists.

    category_ids: the dataset category id of each model class (contiguous order); default
    `annotations.category_ids`. A class id absent from the annotations is an InputError.
    """
    from slsd_cli.data.batching import collate
    from slsd_cli.data.dataset import InstanceDataset
    from slsd_cli.data.transforms import test_transform
    from slsd_cli.model.postprocess import to_results
    from slsd_cli.progress import progress

    out_path = Path(out_path)
    images_dir = Path(images_dir)
    if batch_size < 1 or max_dets < 1 or image_size < 1:
        raise InputError(f"batch size, max dets and image size must be positive "
                         f"(got {batch_size}, {max_dets}, {image_size})")
    category_ids = list(annotations.category_ids if category_ids is None else category_ids)
    num_classes = getattr(model, "num_classes", len(category_ids))
    if len(category_ids) != num_classes:
        raise InputError(f"the model has {num_classes} classes but {len(category_ids)} category ids were given")
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
    dataset = InstanceDataset(_images_only(annotations), images_dir, test_transform(image_size), image_ids=mine)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=partial(collate, size_divisibility=32))
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        device = torch.device("cpu")
    shard = shard_path(out_path, rank)
    with atomic_path(shard) as tmp, open(tmp, "w", encoding="utf-8") as handle, progress() as bar:
        task = bar.add_task(description, total=len(image_ids), status="")
        count = 0
        for batch in loader:
            dets = model.predict(batch.images.to(device), batch.image_sizes)
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
                    device: str | torch.device | None = None) -> list[dict[str, Any]]:
    """Load a run's detector and return its detections over the annotations' images (every rank
    gets the full list). Runs sharded under torchrun, through a temporary results file."""
    if device is None:
        device = distributed.init().device
    model, meta = load_model(checkpoint, model_kind, device)
    size = image_size or int(meta.get("model", {}).get("image_size", 1024))
    category_ids = [c["id"] for c in meta["categories"]]
    tmp_dir = distributed.broadcast_object(tempfile.mkdtemp(prefix="slsd-predict-") if distributed.is_main() else None)
    try:
        out = predict_to_results(model, annotations, images_dir, Path(tmp_dir) / "detections.json",
                                 image_size=size, batch_size=batch_size, max_dets=max_dets, with_probs=with_probs,
                                 category_ids=category_ids)
        results = read_json(out)
        distributed.barrier()
    finally:
        if distributed.is_main():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return results


__all__ = ["MODEL_KINDS", "load_model", "merge_shards", "predict_results", "predict_to_results",
           "resolve_checkpoint", "shard_path"]
