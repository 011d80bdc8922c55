"""Launching a training phase: the one sequence `engine.teacher.run` and `engine.distill.run` share.

    launch(recipe, run_dir, build, *, resume, force, outputs, describe) -> TrainResult

1. lock the run directory for the whole run (rank 0; a second launch into it fails at once), and refuse
   a run directory that is a file, or holds a run without --resume / --force (rank 0 decides);
2. build the phase (`build(recipe, dist)`: every input read and checked, the model built on the
   device) and the periodic evaluator for the phase's `categories` (its inputs checked too);
3. with --resume and a checkpoint, load it into the phase and the optimizer (`trainer.setup`);
4. only then touch the run directory (`run_dir.prepare`: clear a replaced run, write recipe.yaml);
5. train, export, and stop the phase's data workers however the run ends.

So a command that fails before training starts (a missing folder, a bad file, an unfit checkpoint)
leaves the run directory as it was: the corrected rerun needs no --force, and a rejected --resume
never rewrites recipe.yaml. Every torchrun process calls `launch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from slsd_cli import distributed
from slsd_cli import run_dir as runs
from slsd_cli.distributed import DistInfo
from slsd_cli.engine import periodic_eval
from slsd_cli.engine import trainer
from slsd_cli.io import locks
from slsd_cli.progress import info
from slsd_cli.recipe import Recipe
from slsd_cli.typed_yaml import to_dict


def launch(recipe: Recipe, run_dir: str | Path, build: Callable[[Recipe, DistInfo], trainer.Phase], *,
           resume: bool, force: bool, outputs: tuple[str, ...] = runs.RUN_OUTPUTS,
           describe: Callable[[trainer.Phase, DistInfo], str] | None = None) -> trainer.TrainResult:
    """Train the phase `build` makes from `recipe` into `run_dir` (see the module docstring)."""
    run_dir = Path(run_dir)
    runs.check_is_dir(run_dir)
    # the run is locked (rank 0) from the first check to the end: a second launch into it fails at once
    with locks.scope(), distributed.session(recipe.train.device, recipe.train.dist_timeout_minutes) as dist:
        runs.check_on_main(run_dir, outputs, resume, force, dist)
        phase = build(recipe, dist)
        try:
            evaluator = periodic_eval.build(recipe, phase.categories)
            resuming = runs.resumes(run_dir, resume)
            ready = trainer.setup(phase, recipe.train, run_dir, dist, resume=resuming)
            runs.prepare(run_dir, outputs, resuming, recipe, dist)
            if describe is not None:
                info(describe(phase, dist))
            return trainer.train(phase, recipe.train, run_dir, dist, recipe=to_dict(recipe), evaluator=evaluator,
                                 ready=ready)
        finally:
            phase.close()
