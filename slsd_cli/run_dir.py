"""The run directory of a training phase (teacher or distillation): its layout, and the rules for
refusing, clearing and resuming a run. Every other module names a run's files through here.

    RUN/recipe.yaml              the resolved recipe (written once the inputs are validated)
    RUN/model.safetensors        the trained detector (model/weights.py's format: + RUN/model.json)
    RUN/model.json
    RUN/teacher/                 distillation: the EMA teacher, the same two files
    RUN/best/                    with eval.every: the best model so far, the same layout as RUN
    RUN/ckpt/last.pt             the resumable checkpoint (engine/checkpoint.py)
    RUN/ckpt/iter_0001000.pt     with train.keep_last N: the last N periodic checkpoints
    RUN/metrics.jsonl            training records (engine/logbook.py)
    RUN/log.txt                  plain log lines, appended across resumes
    RUN/eval.jsonl               with eval.every: one record per evaluation (engine/periodic_eval.py)
    RUN/.eval_detections.json    ... its detections while they are scored (removed after)
    RUN/tensorboard/             with train.tensorboard

Rank 0 alone looks at and writes the directory; the other processes learn its verdict by broadcast,
because they could otherwise see the files it is about to write. Rank 0 also locks the run for the
whole run (`io.locks`: `PARENT/.RUN.lock`), so a second launch into it fails at once, naming the first.
"""

from __future__ import annotations

import re
from pathlib import Path

from slsd_cli import distributed
from slsd_cli.errors import InputError
from slsd_cli.io import locks, make_dirs, remove_path
from slsd_cli.model.weights import META_NAME as MODEL_META
from slsd_cli.model.weights import WEIGHTS_NAME as MODEL_WEIGHTS
from slsd_cli.recipe import Recipe
from slsd_cli.typed_yaml import save_recipe

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
LOG = "log.txt"
EVAL = "eval.jsonl"
EVAL_DETECTIONS = ".eval_detections.json"
CKPT_DIR = "ckpt"
LAST = "last.pt"
TEACHER_DIR = "teacher"
BEST_DIR = "best"
TENSORBOARD = "tensorboard"
_PERIODIC = re.compile(r"iter_(\d{7,})\.pt")

# what every phase writes; distillation adds its teacher/
RUN_OUTPUTS = (MODEL_WEIGHTS, MODEL_META, METRICS, RECIPE, CKPT_DIR, LOG, EVAL, BEST_DIR, TENSORBOARD)
DISTILL_OUTPUTS = (*RUN_OUTPUTS, TEACHER_DIR)


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / CKPT_DIR / LAST


def periodic_checkpoint(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"iter_{iteration:07d}.pt"


def periodic_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the periodic checkpoints in RUN/ckpt, oldest first."""
    folder = Path(run_dir) / CKPT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("iter_*.pt") if (m := _PERIODIC.fullmatch(p.name))]
    return sorted(found)


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def eval_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVAL


def best_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / BEST_DIR


def teacher_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / TEACHER_DIR


def check_is_dir(run_dir: Path) -> None:
    """A run directory may be missing, but not a file."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError("output exists and is not a directory", path=run_dir)


# the files a resumed run appends to: a symbolic link among them would lead the writes out of the run
APPENDED = (LOG, METRICS, EVAL)


def check_run_dir(run_dir: Path, outputs: tuple[str, ...], resume: bool, force: bool) -> None:
    """An existing run needs --resume (continue it) or --force (start over); a run to continue
    must not hold symbolic links in place of the files it appends to."""
    if resume:
        for name in APPENDED:
            if (run_dir / name).is_symlink():
                raise InputError("is a symbolic link, and slsd writes through no link it did not create: "
                                 "replace it with a regular file (or remove it) and rerun", path=run_dir / name)
        return
    existing = [name for name in outputs if (run_dir / name).exists()]
    if existing and not force:
        raise InputError(f"holds a run ({', '.join(existing)}); pass --resume to continue it or --force to "
                         "start over", path=run_dir)


def clear_run(run_dir: Path, outputs: tuple[str, ...]) -> None:
    """Delete a previous run's outputs (and only those: other files in the folder stay)."""
    for name in outputs:
        path = run_dir / name
        if path.exists() or path.is_symlink():
            remove_path(path)  # a symbolic link is removed, never followed


def check_on_main(run_dir: Path, outputs: tuple[str, ...], resume: bool, force: bool,
                  dist: distributed.DistInfo) -> None:
    """`check_run_dir` decided by rank 0 and raised on every process (every process calls this). Rank
    0 first locks the run for the enclosing `io.locks.scope()` (a second launch fails here)."""
    problem = None
    if dist.is_main:
        try:
            locks.acquire(run_dir)
            check_run_dir(run_dir, outputs, resume, force)
        except InputError as exc:
            problem = exc
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise problem


def resumes(run_dir: Path, resume: bool) -> bool:
    """Whether a run continues: --resume and a checkpoint to continue from (else it starts)."""
    return resume and last_checkpoint(run_dir).is_file()


def prepare(run_dir: Path, outputs: tuple[str, ...], resume: bool, recipe: Recipe,
            dist: distributed.DistInfo) -> bool:
    """Clear the run unless it resumes from a checkpoint, create the folder and write recipe.yaml
    (rank 0), then wait for rank 0. Returns whether the run resumes (every process calls this).
    Call it only once every input is validated: it is the first write into the run."""
    resuming = resumes(run_dir, resume)
    if dist.is_main:
        if not resuming:
            clear_run(run_dir, outputs)
        make_dirs(run_dir)  # a read-only or blocked location: the one-line error
        save_recipe(recipe, run_dir / RECIPE)
    distributed.barrier()
    return resuming


# the two models a run can hold: `RUN/` (a teacher run, or a distillation run's student) and RUN/teacher/
MODEL_KINDS = ("student", "teacher")


def resolve_model(run: str | Path, kind: str = "student") -> Path:
    """The model directory of a run (the layout above): `RUN` itself (a teacher run,
    or a distillation run's student, its default export), or `RUN/teacher` for a distillation
    run's teacher. A path to a model.safetensors / model.json file is used as is."""
    run = Path(run)
    weights = MODEL_WEIGHTS
    if kind not in MODEL_KINDS:
        raise InputError(f"--model must be student or teacher, got {kind!r}")
    if run.is_file():
        if kind == "teacher":
            raise InputError(f"--model teacher needs a run directory (RUN/{TEACHER_DIR}/{weights})", path=run)
        if run.suffix != ".json":
            _check_safetensors(run)
        return run
    if not run.is_dir():
        raise InputError(f"checkpoint not found (expected a run directory or {weights})", path=run)
    if kind == "teacher":
        teacher = teacher_dir(run)
        if (teacher / weights).is_file():
            return teacher
        if (run / weights).is_file() and not teacher.exists():
            # a teacher run (slsd train-teacher) holds its model at the top level
            return run
        raise InputError(f"no teacher model here (expected RUN/{TEACHER_DIR}/{weights})", path=run)
    if not (run / weights).is_file():
        raise InputError(f"no {weights} in this run directory", path=run)
    return run


def _check_safetensors(path: Path) -> None:
    """A weights file given as --checkpoint must be safetensors (an 8-byte header length, then the
    json header): a pickle or any other file is named here, before model.json is looked for."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"unreadable checkpoint ({exc.strerror or exc})", path=path) from None
    length = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if not (0 < length <= size - 8 and head[8:9] == b"{"):
        raise InputError(f"not a safetensors file: --checkpoint takes a run directory or its {MODEL_WEIGHTS} "
                         "(pickled checkpoints are never loaded)", path=path)
