"""The labeled side both training phases share: the labeled data stream and the teacher's
class-similarity smoothing targets.

    resolve_images_dir(recipe) -> data.images, or images/ beside data.train_json (must exist)
    build_labeled_stream(recipe, annotations, dist) -> StepLoader of LSJ-augmented `data.batching.Batch`
        micro-batches (repeat-factor sampling with data.repeat_threshold > 0)
    build_table(recipe, annotations) -> [C, C] target table of `labels.smoothing` (None: mode none)
    add_class_targets(batch, table) -> each ground truth's soft class target `table[label]` (in place)
"""

from __future__ import annotations

import functools
from pathlib import Path

from torch import Tensor

from slsd_cli import distributed
from slsd_cli.data.batching import Batch, collate
from slsd_cli.data.dataset import InstanceDataset
from slsd_cli.data.lvis import Annotations
from slsd_cli.data.sampling import repeat_factors
from slsd_cli.data.transforms import lsj_transform
from slsd_cli.engine.stream import StepLoader
from slsd_cli.errors import InputError
from slsd_cli.labels.smoothing import target_table
from slsd_cli.recipe import Recipe


def resolve_images_dir(recipe: Recipe) -> Path:
    if recipe.data.images is not None:
        images = Path(recipe.data.images)
    else:
        images = Path(recipe.data.train_json).parent / "images"
    if not images.is_dir():
        raise InputError("image folder not found (set data.images or --images)", path=images)
    return images


def build_labeled_stream(recipe: Recipe, annotations: Annotations, dist: distributed.DistInfo) -> StepLoader:
    data, train_cfg = recipe.data, recipe.train
    dataset = InstanceDataset(annotations, resolve_images_dir(recipe),
                              lsj_transform(data.image_size, tuple(data.scale_range)))
    if len(dataset) == 0:
        raise InputError("the training set has no images", path=annotations.path)
    factors = None
    if data.repeat_threshold > 0:
        factors = [float(f) for f in repeat_factors(annotations, data.repeat_threshold, dataset.image_ids)]
    return StepLoader(dataset, functools.partial(collate, pad_to=data.image_size), seed=train_cfg.seed,
                      rank=dist.rank, world_size=dist.world_size, micro_batch=train_cfg.micro_batch,
                      factors=factors, num_workers=data.num_workers, device=dist.device)


def build_table(recipe: Recipe, annotations: Annotations) -> Tensor | None:
    s = recipe.smoothing
    if s.mode == "none":
        return None
    return target_table(s.mode, annotations.num_classes, s.epsilon, s.gamma, s.prototypes, annotations, s.temperature)


def add_class_targets(batch: Batch, table: Tensor) -> Batch:
    """Each ground truth's soft class target: the row of `table` of its label (in place)."""
    for target in batch.targets:
        target["class_targets"] = table.index_select(0, target["labels"])
    return batch
