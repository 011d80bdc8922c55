"""The training recipe: one yaml file, six sections, typed.

    model:      the detector (slsd_cli.model.model_config.ModelConfig)
    data:       labeled training set, input size, repeat-factor sampling, loader workers
    train:      optimiser, schedule, precision, clipping, iterations, checkpoints, logging
    smoothing:  the teacher's class-similarity label smoothing (paper Eq. 1-3)
    distill:    the student phase (paper Eq. 4-5, §3.2)
    eval:       evaluation during training and the best checkpoint (off by default)

`load(path_or_name, overrides)` reads a recipe file, or a bare name (`synthetic_tiny`,
`lvis_eva02_L_teacher`) from the recipes packaged in `slsd_cli/recipes/`, and applies
`section.key=value` overrides. Every numeric key declares its valid range beside its default
(`ranged(...)`, see slsd_cli/typed_yaml.py); an unknown key names the nearest valid ones.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from slsd_cli.errors import InputError
from slsd_cli.model.model_config import ModelConfig
from slsd_cli.typed_yaml import load_recipe, ranged

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"

# Every numeric key states its valid range next to it (`ranged(default, "[low, high]")`, checked on
# every load, for files, overrides and flags alike); rules between keys live in `check()`.
POSITIVE = "(0, inf)"
NON_NEGATIVE = "[0, inf)"
AT_LEAST_ONE = "[1, inf)"
UNIT = "[0, 1]"

# The choices of the method's string keys, named once: the recipe's fields, the library functions that
# take them (labels/smoothing.py, labels/pseudo_labels.py) and the commands' checks read them from here.
SmoothingMode = Literal["none", "uniform", "similarity"]  # the teacher's class targets (Eq. 1-3)
PseudoTargets = Literal["onehot", "soft"]                  # the pseudo-labels' class targets (Eq. 5 for soft)
CorrectionScope = Literal["all", "predicted"]              # the class components Eq. 5 shifts
ThresholdOn = Literal["raw", "corrected"]                  # the score the pseudo-label threshold applies to
BackgroundMode = Literal["hard", "teacher"]                # the unlabeled background RoIs' weights


@dataclass
class DataConfig:
    train_json: Optional[str] = None          # labeled annotations (LVIS/COCO json)
    images: Optional[str] = None              # image folder; None = `images/` beside train_json
    image_size: int = ranged(1024, "[32, 16384]")  # LSJ crop / pad size
    scale_range: list[float] = ranged(default_factory=lambda: [0.1, 2.0], interval="(0, 100]")  # LSJ range
    repeat_threshold: float = ranged(0.001, UNIT)  # repeat-factor sampling threshold; 0 = uniform
    num_workers: int = ranged(4, NON_NEGATIVE)     # data loader processes per training process

    def check(self) -> None:
        if len(self.scale_range) != 2 or self.scale_range[0] > self.scale_range[1]:
            raise ValueError(f"scale_range must be [low, high] with low <= high, got {self.scale_range}")


@dataclass
class TrainConfig:
    iterations: int = ranged(30000, AT_LEAST_ONE)
    batch_per_process: int = ranged(2, AT_LEAST_ONE)  # images per process per iteration
    micro_batch: int = ranged(1, AT_LEAST_ONE)    # images per forward/backward (gradients accumulate)
    lr: float = ranged(4e-5, POSITIVE)
    weight_decay: float = ranged(0.1, NON_NEGATIVE)
    betas: list[float] = ranged(default_factory=lambda: [0.9, 0.999], interval="[0, 1)")
    layer_decay: float = ranged(0.8, "(0, 1]")    # layer-wise lr decay of the backbone (1.0 = off)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_iters: int = ranged(1000, NON_NEGATIVE)
    warmup_factor: float = ranged(0.001, "(0, 1]")  # lr multiplier at iteration 0, rising linearly to 1
    min_lr_ratio: float = ranged(0.0, UNIT)       # cosine floor, as a fraction of lr
    clip_grad: float = ranged(1.0, NON_NEGATIVE)  # max global grad norm; 0 = no clipping
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 (no autocast) on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = ranged(0, "[0, 4294967295]")  # < 2**32: the sample streams use 32-bit seeds
    checkpoint_every: int = ranged(1000, AT_LEAST_ONE)  # iterations between checkpoints (and at the end)
    keep_last: int = ranged(0, NON_NEGATIVE)       # also keep the last N checkpoints as ckpt/iter_<iteration, 7 digits>.pt
    log_every: int = ranged(20, AT_LEAST_ONE)     # iterations between metrics.jsonl lines
    max_nonfinite: int = ranged(5, AT_LEAST_ONE)  # consecutive non-finite losses before aborting
    tensorboard: bool = False                 # also log to RUN/tensorboard (pip install 'slsd[tensorboard]')
    dist_timeout_minutes: int = ranged(30, AT_LEAST_ONE)

    def check(self) -> None:
        if self.batch_per_process % self.micro_batch:
            raise ValueError(f"micro_batch ({self.micro_batch}) must divide batch_per_process "
                             f"({self.batch_per_process})")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers [beta1, beta2], got {self.betas}")


@dataclass
class SmoothingConfig:
    # null (distillation only): the teacher run's smoothing, mode, ε, γ, τ and prototypes alike, so the
    # student's labeled images keep the targets their teacher learned from
    mode: Optional[SmoothingMode] = "none"
    epsilon: float = ranged(0.1, UNIT)        # smoothing mass ε (Eq. 3)
    gamma: float = ranged(1.5, NON_NEGATIVE)  # frequency exponent γ (Eq. 2)
    temperature: float = ranged(1.0, POSITIVE)  # τ of Eq. 2, S_ij / (τ N_j^γ); 1 = the paper, < 1 sharpens S′
    prototypes: Optional[str] = None          # prototypes.safetensors (`slsd prototypes`)


@dataclass
class DistillConfig:
    teacher: Optional[str] = None             # teacher run dir (or model.safetensors)
    unlabeled: Optional[str] = None           # unlabeled.json (`slsd retrieve`)
    unlabeled_images: Optional[str] = None    # image folder of the unlabeled pool
    calibration: Optional[str] = None         # calibration.json (`slsd calibrate`)
    targets: PseudoTargets = "soft"
    lam: float = ranged(2.0, NON_NEGATIVE)    # λ of Eq. 5
    correction_scope: CorrectionScope = "all"
    threshold: float = ranged(0.5, UNIT)      # pseudo-label score threshold
    threshold_on: ThresholdOn = "raw"         # the score it applies to: teacher's, or Eq. 5-corrected
    ignore_low: Optional[float] = ranged(None, UNIT)   # ignore band [ignore_low, threshold]; None = off
    background: BackgroundMode = "hard"       # teacher: background RoIs weighted by the teacher's bg score
    mask_threshold: float = ranged(0.5, "(0, 1)")  # pseudo-mask binarisation
    unsup_weight: float = ranged(1.0, NON_NEGATIVE)
    ema: float = ranged(0.9996, UNIT)
    unlabeled_per_process: Optional[int] = ranged(None, AT_LEAST_ONE)  # None = train.batch_per_process (1:1)


# ---- evaluation during training (engine/periodic_eval.py)
# the summary keys `slsd eval` reports (evaluation.metrics.summary_keys; APr/c/f on LVIS only), and AR@max_dets
EVAL_METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


@dataclass
class EvalConfig:
    every: int = ranged(0, NON_NEGATIVE)      # iterations between evaluations (and at the end); 0 = off
    annotations: Optional[str] = None         # held-out annotations (LVIS/COCO json)
    images: Optional[str] = None              # their image folder; None = `images/` beside the json
    metric: str = "segm/AP"                   # <bbox|segm>/<AP|AP50|AP75|APs|APm|APl|APr|APc|APf>: RUN/best
    max_dets: int = ranged(300, AT_LEAST_ONE)  # detections per image (LVIS rule: 300)

    def check(self) -> None:
        # checked when the recipe loads, not at the first evaluation hours later; which keys the
        # evaluation set's protocol reports (APr/c/f: LVIS only) is checked at launch
        iou_type, _, key = self.metric.partition("/")
        keys = (*EVAL_METRIC_KEYS, f"AR@{self.max_dets}")
        if iou_type not in ("bbox", "segm") or key not in keys:
            raise ValueError(f"metric must be bbox/<key> or segm/<key> with <key> one of {', '.join(keys)} "
                             f"(e.g. segm/APr), got {self.metric!r}")
        if self.every and self.annotations is None:
            raise ValueError("every > 0 needs eval.annotations (held-out annotations json)")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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
    """A recipe file or packaged name, with `section.key=value` overrides; every range checked."""
    return load_recipe(Recipe, resolve_path(path_or_name), overrides)


TEACHER_RECIPES = ("synthetic_tiny", "lvis_eva02_L_teacher")
DISTILL_RECIPES = ("synthetic_tiny_distill", "lvis_eva02_L_distill")


@functools.lru_cache(maxsize=None)
def _packaged(name: str) -> Recipe:
    return load(name)


def field_choices(key: str) -> tuple[str, ...]:
    """The allowed values of a Literal recipe key (empty for other types)."""
    cls: Any = Recipe
    *parents, leaf = key.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    tp = typing.get_type_hints(cls)[leaf]
    if typing.get_origin(tp) is typing.Union:  # Optional[Literal[...]]: the choices of the Literal
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def flag_help(key: str, text: str, recipes: Sequence[str] = TEACHER_RECIPES) -> str:
    """Help of a flag that sets recipe key `key`: `text`, its choices, and the value each packaged
    recipe gives it (the flag's own default is None: not given = the recipe's value)."""
    values = []
    for name in recipes:
        try:
            value: Any = _packaged(name)
        except InputError:  # a broken packaged recipe must not break every command's --help
            continue
        for part in key.split("."):
            value = getattr(value, part)
        values.append(f"{name}: {'null' if value is None else value}")
    choices = field_choices(key)
    one_of = f" One of: {', '.join(choices)}." if choices else ""
    shown = f"; {', '.join(values)}" if values else ""
    return f"{text}{one_of} Sets {key} (default: from the recipe{shown})."


def describe_packaged() -> list[tuple[str, str]]:
    """(name, first line of the file's leading comment) for every packaged recipe."""
    out = []
    for name in packaged_recipes():
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[:1]
        summary = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        out.append((name, summary))
    return out
