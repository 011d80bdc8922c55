"""The supervised phase (paper §3.1): the teacher learns from the labeled split with class-similarity,
frequency-modulated label smoothing.

`run(recipe, run_dir, resume=..., force=...)` builds everything from a `Recipe` (`build_phase`: the
labeled stream and the `[C, C]` target table of `engine.labeled`, the detector) and hands a
`TeacherPhase` to `engine.launch`, which runs the shared loop of `engine.trainer`. The smoothing
reaches the model as each ground truth's `class_targets`: a row gather `table[labels]`; the RoI
heads give a proposal matched to ground truth g the row of g, and a background proposal a pure
background target.

Run directory (`slsd_cli.run_dir`): RUN/recipe.yaml, RUN/metrics.jsonl, RUN/log.txt, RUN/ckpt/last.pt,
and at the end RUN/model.safetensors + RUN/model.json (RUN/eval.jsonl and RUN/best/ with eval.every).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from slsd_cli import distributed
from slsd_cli import run_dir as runs
from slsd_cli.data.batching import Batch
from slsd_cli.data.lvis import load_annotations
from slsd_cli.engine.labeled import add_class_targets, build_labeled_stream, build_table
from slsd_cli.engine.launch import launch
from slsd_cli.engine.seeding import seed_everything
from slsd_cli.engine.stream import StepLoader
from slsd_cli.engine.trainer import TrainResult
from slsd_cli.errors import InputError
from slsd_cli.recipe import Recipe
from slsd_cli.typed_yaml import to_dict


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

    def export(self, out_dir: Path) -> None:
        from slsd_cli.model.weights import save_detector

        save_detector(self.model, out_dir, self.categories, self.recipe.model,
                      extra={"phase": "teacher", "recipe": to_dict(self.recipe)})

    def close(self) -> None:
        self.loader.close()


# ------------------------------------------------------------------------------ set-up


def build_phase(recipe: Recipe, dist: distributed.DistInfo) -> TeacherPhase:
    """Everything the loop needs, on this process's device, every input checked (every process calls this)."""
    from slsd_cli.model.weights import build_detector

    if recipe.data.train_json is None:
        raise InputError("no training annotations: set data.train_json or pass --train-json", record="recipe")
    annotations = load_annotations(recipe.data.train_json)
    table = build_table(recipe, annotations)
    loader = build_labeled_stream(recipe, annotations, dist)
    seed_everything(recipe.train.seed)  # the same initial weights on every process
    model = build_detector(recipe.model, annotations.categories).to(dist.device)
    return TeacherPhase(model, loader, None if table is None else table.to(dist.device), annotations.categories,
                        recipe)


def describe(phase: TeacherPhase, dist: distributed.DistInfo) -> str:
    r = phase.recipe
    return (f"teacher: {len(phase.categories)} classes, {len(phase.loader.dataset)} images, "
            f"{r.train.iterations} iterations x {r.train.batch_per_process} images x {dist.world_size} "
            f"process(es), smoothing {r.smoothing.mode}, device {dist.device}")


def run(recipe: Recipe, run_dir: str | Path, *, resume: bool = False, force: bool = False) -> TrainResult:
    """Train a teacher as `recipe` says, into `run_dir` (every torchrun process calls this)."""
    if recipe.smoothing.mode is None:
        raise InputError("smoothing.mode null means 'the teacher's smoothing' and only applies to slsd distill; "
                         "a teacher needs none, uniform or similarity (--smoothing)", record="recipe")
    return launch(recipe, run_dir, build_phase, resume=resume, force=force, outputs=runs.RUN_OUTPUTS,
                  describe=describe)
