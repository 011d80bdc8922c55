"""`slsd train-teacher`: supervised teacher training with similarity label smoothing (paper §3.1)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from slsd_cli.progress import info

SMOOTHING_MODES = ("none", "uniform", "similarity")


def train_teacher(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe yaml, or a packaged recipe name: synthetic_tiny, "
                                           "lvis_eva02_L_teacher."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides key.sub=value, e.g. "
                                                              "train.lr=1e-4 model.backbone=resnet18."),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Run directory (model, checkpoints, metrics)."),
    smoothing: Optional[str] = typer.Option(None, "--smoothing", help="Label smoothing: none, uniform or "
                                                                      "similarity (smoothing.mode)."),
    epsilon: Optional[float] = typer.Option(None, "--epsilon", help="Smoothing mass ε (smoothing.epsilon)."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="Frequency exponent γ (smoothing.gamma)."),
    prototypes: Optional[Path] = typer.Option(None, "--prototypes", help="prototypes.safetensors from "
                                                                         "`slsd prototypes`."),
    train_json: Optional[Path] = typer.Option(None, "--train-json", help="Labeled annotations (data.train_json)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (data.images; default: "
                                                                 "images/ beside the json)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Training iterations (train.iterations)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (train.seed)."),
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
    from slsd_cli.engine import teacher
    from slsd_cli.errors import InputError

    items = list(overrides or []) + list(ctx.args)
    if smoothing is not None:
        if smoothing not in SMOOTHING_MODES:
            raise InputError(f"--smoothing must be one of {', '.join(SMOOTHING_MODES)}, got {smoothing!r}")
        items.append(f"smoothing.mode={smoothing}")
    flags = {"smoothing.epsilon": epsilon, "smoothing.gamma": gamma, "smoothing.prototypes": prototypes,
             "data.train_json": train_json, "data.images": images, "train.iterations": iterations,
             "train.seed": seed}
    for key, value in flags.items():
        if value is not None:
            items.append(f"{key}={_yaml_value(value)}")
    loaded = recipes.load(recipe, items)
    if loaded.smoothing.mode == "similarity" and loaded.smoothing.prototypes is None:
        raise InputError("--smoothing similarity needs --prototypes (from `slsd prototypes`), or use "
                         "--smoothing uniform / none")
    result = teacher.run(loaded, out_dir, resume=resume, force=force)
    if result is not None:
        s = teacher.summary(result)
        loss = "n/a" if s["final_loss"] is None else f"{s['final_loss']:.4f}"
        info(f"teacher trained: {s['iterations']} iterations, final loss {loss}, {s['skipped_steps']} skipped "
             f"step(s), {s['images_per_s']} images/s -> {out_dir}/model.safetensors")


def _yaml_value(value) -> str:
    """A flag value as yaml text for an override (paths stay strings)."""
    if isinstance(value, Path):
        import json

        return json.dumps(str(value))
    return str(value)
