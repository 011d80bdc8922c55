"""`slsd train-teacher`: supervised teacher training with similarity label smoothing (paper §3.1)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from slsd_cli.progress import info
from slsd_cli.recipe import flag_help


def train_teacher(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe yaml, or a packaged recipe name: synthetic_tiny, "
                                           "lvis_eva02_L_teacher."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides key.sub=value, e.g. "
                                                              "train.lr=1e-4 model.backbone=resnet18."),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Run directory (model, checkpoints, metrics)."),
    smoothing: Optional[str] = typer.Option(None, "--smoothing", help=flag_help("smoothing.mode", "Label smoothing.")),
    epsilon: Optional[float] = typer.Option(None, "--epsilon", help=flag_help("smoothing.epsilon", "Smoothing mass ε (Eq. 3).")),
    gamma: Optional[float] = typer.Option(None, "--gamma", help=flag_help("smoothing.gamma", "Frequency exponent γ (Eq. 2).")),
    temperature: Optional[float] = typer.Option(None, "--temperature", help=flag_help(
        "smoothing.temperature", "Temperature τ of Eq. 2, S_ij / (τ N_j^γ): 1 = the paper, below 1 the class "
        "similarity shapes the targets more.")),
    prototypes: Optional[Path] = typer.Option(None, "--prototypes", help="prototypes.safetensors from "
                                                                         "`slsd prototypes`."),
    train_json: Optional[Path] = typer.Option(None, "--train-json", help="Labeled annotations (data.train_json)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (data.images; default: "
                                                                 "images/ beside the json)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help=flag_help("train.iterations", "Training iterations.")),
    seed: Optional[int] = typer.Option(None, "--seed", help=flag_help("train.seed", "Random seed.")),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN from RUN/ckpt/last.pt when it exists "
                                                        "(else start); safe under torchrun --max-restarts."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run in --out-dir."),
) -> None:
    """Train the teacher detector on a labeled split.

    Example: slsd train-teacher synthetic_tiny --train-json synth/train.json --smoothing similarity
    --prototypes prototypes.safetensors --out-dir runs/teacher

    Multi-GPU: torchrun --nproc_per_node 8 --no-python slsd train-teacher lvis_eva02_L_teacher ...
    """
    from slsd_cli import recipe as recipes
    from slsd_cli.commands._options import check_choice
    from slsd_cli.commands._training import trained_line
    from slsd_cli.engine import teacher
    from slsd_cli.errors import InputError
    from slsd_cli.typed_yaml import apply_flags

    check_choice("--smoothing", smoothing, "smoothing.mode")
    # each flag given sets its typed recipe field (checked like the yaml, never re-parsed), after the overrides
    flags = {"smoothing.mode": smoothing, "smoothing.epsilon": epsilon, "smoothing.gamma": gamma,
             "smoothing.temperature": temperature,
             "smoothing.prototypes": prototypes, "data.train_json": train_json, "data.images": images,
             "train.iterations": iterations, "train.seed": seed}
    loaded = apply_flags(recipes.load(recipe, list(overrides or []) + list(ctx.args)), flags)
    if loaded.smoothing.mode == "similarity" and loaded.smoothing.prototypes is None:
        raise InputError("--smoothing similarity needs --prototypes (from `slsd prototypes`), or use "
                         "--smoothing uniform / none")
    result = teacher.run(loaded, out_dir, resume=resume, force=force)
    info(f"teacher trained: {trained_line(result)} -> {out_dir}/model.safetensors")
