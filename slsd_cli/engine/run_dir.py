"""The run directory of a training phase (teacher or distillation): refuse to overwrite a run
without --resume / --force, clear it for a fresh start, and write the resolved recipe.

Rank 0 alone looks at and writes the directory; the other processes learn its verdict by broadcast,
because they could otherwise see the files it is about to write.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from slsd_cli import distributed
from slsd_cli.config import save_recipe
from slsd_cli.engine import checkpoint as ckpt
from slsd_cli.errors import InputError
from slsd_cli.recipe import Recipe

# what every phase writes (a phase adds its own, e.g. distillation's teacher/)
RUN_OUTPUTS = ("model.safetensors", "model.json", "metrics.jsonl", "recipe.yaml", "ckpt")


def check_is_dir(run_dir: Path) -> None:
    """A run directory may be missing, but not a file."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError("output exists and is not a directory", path=run_dir)


def check_run_dir(run_dir: Path, outputs: tuple[str, ...], resume: bool, force: bool) -> None:
    """An existing run needs --resume (continue it) or --force (start over)."""
    if resume:
        return
    existing = [name for name in outputs if (run_dir / name).exists()]
    if existing and not force:
        raise InputError(f"holds a run ({', '.join(existing)}); pass --resume to continue it or --force to "
                         "start over", path=run_dir)


def clear_run(run_dir: Path, outputs: tuple[str, ...]) -> None:
    """Delete a previous run's outputs (and only those: other files in the folder stay)."""
    for name in outputs:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def check_on_main(run_dir: Path, outputs: tuple[str, ...], resume: bool, force: bool,
                  dist: distributed.DistInfo) -> None:
    """`check_run_dir` decided by rank 0 and raised on every process (every process calls this)."""
    problem = None
    if dist.is_main:
        try:
            check_run_dir(run_dir, outputs, resume, force)
        except InputError as exc:
            problem = exc
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise problem


def prepare(run_dir: Path, outputs: tuple[str, ...], resume: bool, recipe: Recipe,
            dist: distributed.DistInfo) -> bool:
    """Clear the run unless it resumes from a checkpoint, create the folder and write recipe.yaml
    (rank 0), then wait for rank 0. Returns whether the run resumes (every process calls this)."""
    resuming = resume and ckpt.checkpoint_path(run_dir).is_file()
    if dist.is_main:
        if not resuming:
            clear_run(run_dir, outputs)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    distributed.barrier()
    return resuming
