"""`slsd distill`: teacher-student distillation with calibration-corrected soft pseudo-labels (paper §3.2)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from slsd_cli.progress import info
from slsd_cli.recipe import DISTILL_RECIPES, flag_help


def distill(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe yaml, or a packaged recipe name: synthetic_tiny_distill, "
                                           "lvis_eva02_L_distill."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides key.sub=value, e.g. "
                                                              "train.iterations=100 distill.threshold=0.6."),
    teacher: Optional[Path] = typer.Option(None, "--checkpoint", help="The teacher: a run dir of `slsd "
                                                                      "train-teacher` (or its model.safetensors); "
                                                                      "student and EMA teacher start from it."),
    teacher_alias: Optional[Path] = typer.Option(None, "--teacher", hidden=True, help="Old spelling of --checkpoint."),
    unlabeled: Optional[Path] = typer.Option(None, "--unlabeled", help="Unlabeled image list (unlabeled.json "
                                                                       "from `slsd retrieve`)."),
    unlabeled_images: Optional[Path] = typer.Option(None, "--unlabeled-images", help="Folder of the unlabeled "
                                                                                     "images (default: the one "
                                                                                     "`slsd retrieve` recorded in "
                                                                                     "the json, else images/ "
                                                                                     "beside it)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="calibration.json from `slsd "
                                                                           "calibrate` (Δ of Eq. 5)."),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Student run directory."),
    targets: Optional[str] = typer.Option(None, "--targets", help=flag_help("distill.targets", "Pseudo-label class targets.", DISTILL_RECIPES)),
    lam: Optional[float] = typer.Option(None, "--lambda", help=flag_help("distill.lam", "Calibration correction λ of Eq. 5 (0 = plain soft "
                                                                        "targets).", DISTILL_RECIPES)),
    correction_scope: Optional[str] = typer.Option(None, "--correction-scope", help=flag_help(
        "distill.correction_scope", "Correct every class component (all) or the detected class only (predicted).", DISTILL_RECIPES)),
    score_threshold: Optional[float] = typer.Option(None, "--score-threshold", help=flag_help(
        "distill.threshold", "Pseudo-label score threshold.", DISTILL_RECIPES)),
    threshold_alias: Optional[float] = typer.Option(None, "--threshold", hidden=True,
                                                    help="Old spelling of --score-threshold."),
    unsup_weight: Optional[float] = typer.Option(None, "--unsup-weight", help=flag_help(
        "distill.unsup_weight", "Weight of the unlabeled images' losses.", DISTILL_RECIPES)),
    ema: Optional[float] = typer.Option(None, "--ema", help=flag_help("distill.ema", "EMA decay of the teacher.", DISTILL_RECIPES)),
    smoothing: Optional[str] = typer.Option(None, "--smoothing", help=flag_help(
        "smoothing.mode", "The labeled images' label smoothing (null: the teacher run's, with its ε, γ, τ and "
        "prototypes).", DISTILL_RECIPES)),
    epsilon: Optional[float] = typer.Option(None, "--epsilon", help=flag_help(
        "smoothing.epsilon", "Labeled images' smoothing mass ε (Eq. 3), with --smoothing.", DISTILL_RECIPES)),
    gamma: Optional[float] = typer.Option(None, "--gamma", help=flag_help(
        "smoothing.gamma", "Labeled images' frequency exponent γ (Eq. 2), with --smoothing.", DISTILL_RECIPES)),
    temperature: Optional[float] = typer.Option(None, "--temperature", help=flag_help(
        "smoothing.temperature", "Labeled images' temperature τ of Eq. 2, with --smoothing.", DISTILL_RECIPES)),
    train_json: Optional[Path] = typer.Option(None, "--train-json", help="Labeled annotations (data.train_json; "
                                                                         "default: the teacher run's)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Labeled image folder (data.images)."),
    prototypes: Optional[Path] = typer.Option(None, "--prototypes", help="prototypes.safetensors for the labeled "
                                                                         "images' smoothing (default: the "
                                                                         "teacher run's)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help=flag_help("train.iterations", "Training iterations.", DISTILL_RECIPES)),
    seed: Optional[int] = typer.Option(None, "--seed", help=flag_help("train.seed", "Random seed.", DISTILL_RECIPES)),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN2 from RUN2/ckpt/last.pt when it exists "
                                                        "(else start); safe under torchrun --max-restarts."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run in --out-dir."),
) -> None:
    """Distil a teacher into a student on labeled + unlabeled images (EMA teacher, soft pseudo-labels).

    Example: slsd distill synthetic_tiny_distill --checkpoint runs/teacher --unlabeled synth/pool.json
    --calibration calibration.json --out-dir runs/student

    Multi-GPU: torchrun --nproc_per_node 8 --no-python slsd distill lvis_eva02_L_distill ...
    """
    from slsd_cli import recipe as recipes
    from slsd_cli.commands._options import check_choice, renamed
    from slsd_cli.commands._training import trained_line
    from slsd_cli.engine import distill as engine
    from slsd_cli.errors import InputError
    from slsd_cli.typed_yaml import apply_flags

    check_choice("--targets", targets, "distill.targets")
    check_choice("--correction-scope", correction_scope, "distill.correction_scope")
    check_choice("--smoothing", smoothing, "smoothing.mode")
    teacher = renamed(teacher, teacher_alias, "--checkpoint", "--teacher")
    score_threshold = renamed(score_threshold, threshold_alias, "--score-threshold", "--threshold")
    # each flag given sets its typed recipe field (checked like the yaml, never re-parsed), after the overrides
    flags = {"distill.teacher": teacher, "distill.unlabeled": unlabeled, "distill.unlabeled_images": unlabeled_images,
             "distill.calibration": calibration, "distill.targets": targets, "distill.lam": lam,
             "distill.correction_scope": correction_scope, "distill.threshold": score_threshold,
             "distill.unsup_weight": unsup_weight, "distill.ema": ema, "data.train_json": train_json,
             "data.images": images, "smoothing.prototypes": prototypes, "smoothing.mode": smoothing,
             "smoothing.epsilon": epsilon, "smoothing.gamma": gamma, "smoothing.temperature": temperature,
             "train.iterations": iterations,
             "train.seed": seed}
    loaded = apply_flags(recipes.load(recipe, list(overrides or []) + list(ctx.args)), flags)
    if loaded.smoothing.mode is None and (epsilon, gamma, temperature) != (None, None, None):
        raise InputError("--epsilon / --gamma / --temperature need --smoothing MODE: with smoothing.mode null the "
                         "labeled images take the teacher run's whole smoothing")
    result = engine.run(loaded, out_dir, resume=resume, force=force)
    info(f"student trained: {trained_line(result)} -> {out_dir}/model.safetensors (student), "
         f"{out_dir}/teacher/model.safetensors (EMA teacher)")
