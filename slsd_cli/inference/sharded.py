"""Sharded detector inference -> a results json (LVIS/COCO results format, RLE masks).

Under torchrun each rank predicts its contiguous block of the images (`shard_indices`) and streams
its results, one json line per detection, into `OUT.rank{r}.jsonl` (written atomically). After a
barrier rank 0 concatenates the shards, in rank order, into `OUT` (a json list, written atomically,
line by line: detections are never gathered in memory) and removes them. Because the blocks are
contiguous and in image-id order, the merged file is the one a single process writes.

`predict_to_results(predictor_or_model, annotations, images_dir, out_path, ...)` writes the results
of a `slsd_cli.inference.predictor.Predictor` (or of a bare detector, wrapped in one: the same padding,
threshold and precision as every other caller); `predict_results` loads a run (student or
teacher) and does it and returns the detections (for `slsd calibrate --checkpoint`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch

from slsd_cli import distributed, interrupts
from slsd_cli.data.lvis import Annotations
from slsd_cli.errors import InputError, worker_errors
from slsd_cli.data.results import write_results
from slsd_cli.io import atomic_path, read_json, remove_leftovers, scratch_dir


def shard_path(out_path: str | Path, rank: int) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.name}.rank{rank}.jsonl")


def _images_only(annotations: Annotations) -> Annotations:
    """The same images without ground truth, so the dataset does not rasterise masks it won't use."""
    return Annotations(path=annotations.path, data={**annotations.data, "annotations": []},
                       protocol=annotations.protocol)


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
    from slsd_cli.inference.predictor import Predictor
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
                                         collate_fn=partial(collate, size_divisibility=32),
                                         worker_init_fn=interrupts.worker_init)
    shard = shard_path(out_path, rank)
    if distributed.is_main():  # shards a killed run left behind
        remove_leftovers(out_path.parent, f"{out_path.name}.rank*.jsonl", f".{out_path.name}.rank*.jsonl.*.tmp")
    distributed.barrier()
    with atomic_path(shard) as tmp, open(tmp, "w", encoding="utf-8") as handle, progress() as bar:
        task = bar.add_task(description, total=len(image_ids), status="")
        count = 0
        for batch in worker_errors(loader):
            dets = predictor.predict(batch.images, batch.image_sizes, score_threshold=score_threshold)
            for det, image_id, input_size, orig_size in zip(dets, batch.image_ids, batch.image_sizes,
                                                            batch.orig_sizes):
                for record in to_results(det, image_id, category_ids, None, orig_size, with_probs=with_probs,
                                         input_size=input_size, max_dets=max_dets):
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
    from slsd_cli.inference.predictor import load_predictor

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

