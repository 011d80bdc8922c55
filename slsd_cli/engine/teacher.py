"""The supervised phase (paper §3.1): the teacher learns from the labeled split with class-similarity,
frequency-modulated label smoothing.

`run(recipe, run_dir, resume=..., force=...)` builds everything from a `Recipe` (data stream with
repeat-factor sampling and LSJ, the detector, the `[C, C]` target table of `labels.smoothing`) and
hands a `TeacherPhase` to the shared loop in `engine.trainer`. The smoothing reaches the model as
each ground truth's `class_targets`: a row gather `table[labels]`; the RoI heads give a proposal
matched to ground truth g the row of g, and a background proposal a pure background target.

Run directory:  RUN/recipe.yaml (resolved recipe), RUN/metrics.jsonl, RUN/ckpt/last.pt,
and at the end RUN/model.safetensors + RUN/model.json.
"""

from __future__ import annotations

import functools
from pathlib import Path

from torch import Tensor, nn

from slsd_cli import distributed
from slsd_cli.config import to_dict
from slsd_cli.data.batching import Batch, collate
from slsd_cli.data.dataset import InstanceDataset
from slsd_cli.data.lvis import Annotations, load_annotations
from slsd_cli.data.sampling import repeat_factors
from slsd_cli.data.transforms import lsj_transform
from slsd_cli.engine import run_dir as runs
from slsd_cli.engine.trainer import StepLoader, TrainResult, seed_everything, train_recipe
from slsd_cli.errors import InputError
from slsd_cli.labels.smoothing import target_table
from slsd_cli.progress import info
from slsd_cli.recipe import Recipe


class TeacherPhase:
    """Supervised training of one detector; see `engine.trainer.Phase`."""

    def __init__(self, model: nn.Module, loader: StepLoader, table: Tensor | None, categories: list[dict],
                 recipe: Recipe):
        self.model = model
        self.trainable = model
        self.loader = loader
        self.table = table
        self.categories = categories
        self.recipe = recipe

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def next_batch(self) -> Batch:
        batch = self.loader.next()
        if self.table is not None:
            add_class_targets(batch, self.table)
        return batch

    def losses(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        return model(batch.images, batch.image_sizes, batch.targets)

    def after_step(self, iteration: int) -> None:
        pass

    def log_stats(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])

    def export(self, run_dir: Path) -> None:
        from slsd_cli.model.weights import save_detector

        save_detector(self.model, run_dir, self.categories, self.recipe.model,
                      extra={"phase": "teacher", "recipe": to_dict(self.recipe)})

    def close(self) -> None:
        self.loader.close()


def add_class_targets(batch: Batch, table: Tensor) -> Batch:
    """Each ground truth's soft class target: the row of `table` of its label (in place)."""
    for target in batch.targets:
        target["class_targets"] = table.index_select(0, target["labels"])
    return batch


# ------------------------------------------------------------------------------ set-up


def resolve_images_dir(recipe: Recipe) -> Path:
    if recipe.data.images is not None:
        images = Path(recipe.data.images)
    else:
        images = Path(recipe.data.train_json).parent / "images"
    if not images.is_dir():
        raise InputError("image folder not found (set data.images or --images)", path=images)
    return images


def build_data(recipe: Recipe, annotations: Annotations, dist: distributed.DistInfo) -> StepLoader:
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


def build_model(recipe: Recipe, annotations: Annotations) -> nn.Module:
    from slsd_cli.model.weights import build_detector

    return build_detector(recipe.model, annotations.categories)


def build_table(recipe: Recipe, annotations: Annotations) -> Tensor | None:
    s = recipe.smoothing
    if s.mode == "none":
        return None
    return target_table(s.mode, annotations.num_classes, s.epsilon, s.gamma, s.prototypes, annotations)


def run(recipe: Recipe, run_dir: str | Path, *, resume: bool = False, force: bool = False) -> TrainResult:
    """Train a teacher as `recipe` says, into `run_dir` (every torchrun process calls this)."""
    run_dir = Path(run_dir)
    if recipe.data.train_json is None:
        raise InputError("no training annotations: set data.train_json or pass --train-json", record="recipe")
    runs.check_is_dir(run_dir)
    dist = distributed.init(recipe.train.device, recipe.train.dist_timeout_minutes)
    try:
        runs.check_on_main(run_dir, runs.RUN_OUTPUTS, resume, force, dist)
        # inputs first: a bad path or file fails before anything is written
        annotations = load_annotations(recipe.data.train_json)
        table = build_table(recipe, annotations)
        loader = build_data(recipe, annotations, dist)
        seed_everything(recipe.train.seed)  # the same initial weights on every process
        model = build_model(recipe, annotations).to(dist.device)
        phase = TeacherPhase(model, loader, None if table is None else table.to(dist.device),
                             annotations.categories, recipe)

        resuming = runs.prepare(run_dir, runs.RUN_OUTPUTS, resume, recipe, dist)
        info(f"teacher: {annotations.num_classes} classes, {len(loader.dataset)} images, "
             f"{recipe.train.iterations} iterations x {recipe.train.batch_per_process} images x "
             f"{dist.world_size} process(es), smoothing {recipe.smoothing.mode}, device {dist.device}")
        return train_recipe(phase, recipe, run_dir, dist, resume=resuming)
    finally:
        distributed.cleanup()
