"""The training recipe: one yaml file, five sections, typed.

    model:      the detector (slsd_cli.model.config.ModelConfig)
    data:       labeled training set, input size, repeat-factor sampling, loader workers
    train:      optimiser, schedule, precision, clipping, iterations, checkpoints, logging
    smoothing:  the teacher's class-similarity label smoothing (paper Eq. 1-3)
    distill:    the student phase (paper Eq. 4-5, §3.2)

`load(path_or_name, overrides)` reads a recipe file, or a bare name (`synthetic_tiny`,
`lvis_eva02_L_teacher`) from the recipes packaged in `slsd_cli/recipes/`, and applies
`section.key=value` overrides. Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from slsd_cli.config import load_recipe
from slsd_cli.errors import InputError
from slsd_cli.model.config import ModelConfig

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


@dataclass
class DataConfig:
    train_json: Optional[str] = None          # labeled annotations (LVIS/COCO json)
    images: Optional[str] = None              # image folder; None = `images/` beside train_json
    image_size: int = 1024                    # LSJ crop / pad size
    scale_range: list[float] = field(default_factory=lambda: [0.1, 2.0])   # LSJ resize range
    repeat_threshold: float = 0.001           # repeat-factor sampling threshold; 0 = uniform
    num_workers: int = 4                      # data loader processes per training process


@dataclass
class TrainConfig:
    iterations: int = 30000
    batch_per_process: int = 2                # images per process per iteration
    micro_batch: int = 1                      # images per forward/backward (gradients accumulate)
    lr: float = 4e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float = 0.8                  # layer-wise lr decay of the backbone (1.0 = off)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_iters: int = 1000
    warmup_factor: float = 0.001              # lr multiplier at iteration 0, rising linearly to 1
    min_lr_ratio: float = 0.0                 # cosine floor, as a fraction of lr
    clip_grad: float = 1.0                    # max global grad norm; 0 = no clipping
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 (no autocast) on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    checkpoint_every: int = 1000              # iterations between checkpoints (and at the end)
    log_every: int = 20                       # iterations between metrics.jsonl lines
    max_nonfinite: int = 5                    # consecutive non-finite losses before aborting
    tensorboard: bool = False                 # also log to RUN/tensorboard (needs tensorboard)
    dist_timeout_minutes: int = 30


@dataclass
class SmoothingConfig:
    mode: Literal["none", "uniform", "similarity"] = "none"
    epsilon: float = 0.1
    gamma: float = 1.5
    prototypes: Optional[str] = None          # prototypes.safetensors (`slsd prototypes`)


@dataclass
class DistillConfig:
    teacher: Optional[str] = None             # teacher run dir (or model.safetensors)
    unlabeled: Optional[str] = None           # unlabeled.json (`slsd retrieve`)
    unlabeled_images: Optional[str] = None    # image folder of the unlabeled pool
    calibration: Optional[str] = None         # calibration.json (`slsd calibrate`)
    targets: Literal["onehot", "soft"] = "soft"
    lam: float = 2.0                          # λ of Eq. 5
    correction_scope: Literal["all", "predicted"] = "all"
    threshold: float = 0.5                    # pseudo-label score threshold
    mask_threshold: float = 0.5               # pseudo-mask binarisation
    unsup_weight: float = 1.0
    ema: float = 0.9996
    unlabeled_per_process: Optional[int] = None   # None = train.batch_per_process (1:1)


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def packaged_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_path(path_or_name: str | Path) -> Path:
    """A recipe file, or the bare name of a packaged recipe (`synthetic_tiny`)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = str(path_or_name)
    if "/" not in name and "\\" not in name:
        candidate = RECIPES_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if candidate.is_file():
            return candidate
    raise InputError(f"recipe not found (packaged recipes: {', '.join(packaged_recipes())})", path=path)


def load(path_or_name: str | Path, overrides: list[str] | None = None) -> Recipe:
    recipe = load_recipe(Recipe, resolve_path(path_or_name), overrides)
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    """Value checks that types alone cannot express."""
    t = recipe.train
    checks = [
        (t.iterations >= 1, "train.iterations must be >= 1"),
        (t.batch_per_process >= 1, "train.batch_per_process must be >= 1"),
        (t.micro_batch >= 1 and t.batch_per_process % t.micro_batch == 0,
         "train.micro_batch must be >= 1 and divide train.batch_per_process"),
        (t.lr > 0, "train.lr must be > 0"),
        (0 < t.layer_decay <= 1, "train.layer_decay must lie in (0, 1]"),
        (t.warmup_iters >= 0 and 0 < t.warmup_factor <= 1, "train.warmup_iters >= 0 and 0 < warmup_factor <= 1"),
        (0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio must lie in [0, 1]"),
        (t.clip_grad >= 0, "train.clip_grad must be >= 0"),
        (t.checkpoint_every >= 1 and t.log_every >= 1, "train.checkpoint_every and log_every must be >= 1"),
        (t.max_nonfinite >= 1, "train.max_nonfinite must be >= 1"),
        (len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas must be two numbers in [0, 1)"),
        (len(recipe.data.scale_range) == 2 and 0 < recipe.data.scale_range[0] <= recipe.data.scale_range[1],
         "data.scale_range must be [low, high] with 0 < low <= high"),
        (recipe.data.image_size >= 32, "data.image_size must be >= 32"),
        (recipe.data.repeat_threshold >= 0, "data.repeat_threshold must be >= 0"),
        (recipe.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (0 <= recipe.smoothing.epsilon <= 1, "smoothing.epsilon must lie in [0, 1]"),
        (0 <= recipe.distill.ema <= 1, "distill.ema must lie in [0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message, record="recipe")
