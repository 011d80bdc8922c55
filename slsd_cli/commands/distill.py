"""`slsd distill`: teacher-student distillation with calibration-corrected soft pseudo-labels (paper §3.2)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from slsd_cli.progress import info

TARGET_MODES = ("onehot", "soft")
SCOPES = ("all", "predicted")


def distill(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe yaml, or a packaged recipe name: synthetic_tiny_distill, "
                                           "lvis_eva02_L_distill."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides key.sub=value, e.g. "
                                                              "train.iterations=100 distill.threshold=0.6."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Teacher run dir (or its model.safetensors): "
                                                                   "student and EMA teacher start from it."),
    unlabeled: Optional[Path] = typer.Option(None, "--unlabeled", help="Unlabeled image list (unlabeled.json "
                                                                       "from `slsd retrieve`)."),
    unlabeled_images: Optional[Path] = typer.Option(None, "--unlabeled-images", help="Folder of the unlabeled "
                                                                                     "images (default: images/ "
                                                                                     "beside the json)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="calibration.json from `slsd "
                                                                           "calibrate` (Δ of Eq. 5)."),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Student run directory."),
    targets: Optional[str] = typer.Option(None, "--targets", help="Pseudo-label class targets: onehot or soft "
                                                                  "(distill.targets)."),
    lam: Optional[float] = typer.Option(None, "--lambda", help="Calibration correction λ of Eq. 5 "
                                                               "(distill.lam; 0 = plain soft targets)."),
    correction_scope: Optional[str] = typer.Option(None, "--correction-scope", help="Correct every class "
                                                                                    "component (all) or the "
                                                                                    "detected class only "
                                                                                    "(predicted)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Pseudo-label score threshold "
                                                                        "(distill.threshold)."),
    unsup_weight: Optional[float] = typer.Option(None, "--unsup-weight", help="Weight of the unlabeled images' "
                                                                              "losses (distill.unsup_weight)."),
    ema: Optional[float] = typer.Option(None, "--ema", help="EMA decay of the teacher (distill.ema)."),
    train_json: Optional[Path] = typer.Option(None, "--train-json", help="Labeled annotations (data.train_json; "
                                                                         "default: the teacher run's)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Labeled image folder (data.images)."),
    prototypes: Optional[Path] = typer.Option(None, "--prototypes", help="prototypes.safetensors for the labeled "
                                                                         "images' smoothing (default: the "
                                                                         "teacher run's)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Training iterations (train.iterations)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (train.seed)."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN2 from RUN2/ckpt/last.pt when it exists "
                                                        "(else start); safe under torchrun --max-restarts."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run in --out-dir."),
) -> None:
    """Distil a teacher into a student on labeled + unlabeled images (EMA teacher, soft pseudo-labels).

    Example: slsd distill synthetic_tiny_distill --teacher runs/teacher --unlabeled synth/pool.json
    --calibration calibration.json --out-dir runs/student

    Multi-GPU: torchrun --nproc_per_node 8 --no-python slsd distill lvis_eva02_L_distill ...
    """
    from slsd_cli.commands._training import check_choice, load_recipe, trained_line
    from slsd_cli.engine import distill as engine

    check_choice("--targets", targets, TARGET_MODES)
    check_choice("--correction-scope", correction_scope, SCOPES)
    flags = {"distill.teacher": teacher, "distill.unlabeled": unlabeled, "distill.unlabeled_images": unlabeled_images,
             "distill.calibration": calibration, "distill.targets": targets, "distill.lam": lam,
             "distill.correction_scope": correction_scope, "distill.threshold": threshold,
             "distill.unsup_weight": unsup_weight, "distill.ema": ema, "data.train_json": train_json,
             "data.images": images, "smoothing.prototypes": prototypes, "train.iterations": iterations,
             "train.seed": seed}
    loaded = load_recipe(recipe, list(overrides or []) + list(ctx.args), flags)
    result = engine.run(loaded, out_dir, resume=resume, force=force)
    info(f"student trained: {trained_line(result)} -> {out_dir}/model.safetensors (student), "
         f"{out_dir}/teacher/model.safetensors (EMA teacher)")
