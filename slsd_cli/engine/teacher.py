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
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from slsd_cli import distributed
from slsd_cli.config import save_recipe, to_dict
from slsd_cli.data.batching import Batch, collate
from slsd_cli.data.dataset import InstanceDataset
from slsd_cli.data.lvis import Annotations, load_annotations
from slsd_cli.data.sampling import repeat_factors
from slsd_cli.data.transforms import lsj_transform
from slsd_cli.engine import checkpoint as ckpt
from slsd_cli.engine.trainer import StepLoader, TrainResult, seed_everything, train
from slsd_cli.errors import InputError
from slsd_cli.labels.smoothing import target_table
from slsd_cli.progress import info
from slsd_cli.recipe import Recipe

RUN_OUTPUTS = ("model.safetensors", "model.json", "metrics.jsonl", "recipe.yaml", "ckpt")


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


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """An existing run needs --resume (continue it) or --force (start over)."""
    if resume:
        return
    existing = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if existing and not force:
        raise InputError(f"holds a run ({', '.join(existing)}); pass --resume to continue it or --force to "
                         "start over", path=run_dir)


def _clear_run(run_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


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
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError("output exists and is not a directory", path=run_dir)
    dist = distributed.init(recipe.train.device, recipe.train.dist_timeout_minutes)
    try:
        # rank 0 decides (the others could otherwise see the files it is about to write)
        problem = None
        if dist.is_main:
            try:
                check_run_dir(run_dir, resume, force)
            except InputError as exc:
                problem = exc
        problem = distributed.broadcast_object(problem)
        if problem is not None:
            raise problem
        # inputs first: a bad path or file fails before anything is written
        annotations = load_annotations(recipe.data.train_json)
        table = build_table(recipe, annotations)
        loader = build_data(recipe, annotations, dist)
        seed_everything(recipe.train.seed)  # the same initial weights on every process
        model = build_model(recipe, annotations).to(dist.device)
        phase = TeacherPhase(model, loader, None if table is None else table.to(dist.device),
                             annotations.categories, recipe)

        resuming = resume and ckpt.checkpoint_path(run_dir).is_file()
        if dist.is_main:
            if not resuming:
                _clear_run(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, run_dir / "recipe.yaml")
        distributed.barrier()
        info(f"teacher: {annotations.num_classes} classes, {len(loader.dataset)} images, "
             f"{recipe.train.iterations} iterations x {recipe.train.batch_per_process} images x "
             f"{dist.world_size} process(es), smoothing {recipe.smoothing.mode}, device {dist.device}")
        try:
            return train(phase, recipe.train, run_dir, dist, resume=resuming, recipe=to_dict(recipe))
        finally:
            phase.close()
    finally:
        distributed.cleanup()


def summary(result: TrainResult) -> dict[str, Any]:
    return {"run_dir": str(result.run_dir), "iterations": result.iterations, "skipped_steps": result.skipped,
            "final_loss": result.final_loss, "images_per_s": round(result.images_per_s, 2)}

