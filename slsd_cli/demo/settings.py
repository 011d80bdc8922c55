"""Demo sizes, the rows of the paper's Table 1, and hyperparameter settings.

A *setting* is an ordered mapping of recipe keys to values (`{"smoothing.epsilon": 0.1}`); it is
passed to `slsd train-teacher` / `slsd distill` as `key=value` overrides and spelled into the run's
directory name (`slug`), so the same setting always lands in the same directory and a finished run
is reused — by a rerun, and by Table 1 when the held-out grid already trained that setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from slsd_cli.errors import InputError

TEACHER_RECIPE = "synthetic_tiny"
DISTILL_RECIPE = "synthetic_tiny_distill"

# recipe key -> short name used in run-directory names and tables
SHORT_NAMES = {
    "smoothing.epsilon": "eps",
    "smoothing.gamma": "gamma",
    "smoothing.temperature": "tau",
    "distill.correction_scope": "scope",
    "distill.lam": "lam",
    "distill.threshold": "thr",
    "distill.unsup_weight": "uw",
    "distill.threshold_on": "on",
    "distill.ignore_low": "ign",
    "distill.background": "bg",
}


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is. The quick size fits 10 minutes on 2 CPU cores; tests use smaller ones."""

    classes: int = 40
    train_images: int = 500
    val_images: int = 100
    pool_images: int = 300
    calib_images: int = 100  # slsd synth's calibration split (Δ is measured there); >= 5 images of every class
    image_size: int = 128
    prototype_image_size: int = 224  # prototypes' input size (slsd prototypes --image-size), not the data's
    teacher_iterations: int = 300
    distill_iterations: int = 150
    retrieve_k: int = 8
    bootstrap: int = 100  # bootstrap replicates over val images (0 = no bootstrap)
    eval_max_dets: int = 300  # detections per image scored by `slsd eval` (LVIS: 300; tests use fewer)


QUICK = DemoSize()
# Table 1: a larger val set, so that its AP noise (measured by the bootstrap) is below the gaps
# between rows; fewer replicates, as every replicate scores every run of every seed (18 runs x 50
# evaluations of 300 images; the interval uses the replicates' standard deviation, not their tails).
# A calibration split of 200 images: tighter Δ intervals for the premise check, at 3 teacher and 3 EMA
# teacher evaluations of 200 images.
FULL = DemoSize(val_images=300, calib_images=200, bootstrap=50)


@dataclass(frozen=True)
class Regime:
    """A training regime the premise check can be run in (`slsd demo --regime NAME`): changes to the
    demo's size and recipe overrides given to every `slsd train-teacher` and `slsd distill`. One
    folder holds one regime (recorded beside the data sizes)."""

    name: str
    description: str
    size: tuple[tuple[str, int], ...] = ()      # DemoSize fields it changes
    overrides: tuple[str, ...] = ()             # key=value, for the teachers and the students alike

    def apply(self, size: DemoSize) -> DemoSize:
        import dataclasses

        return dataclasses.replace(size, **dict(self.size))


# The knobs issue 23 names as able to bring on the paper's premise (frequent classes over-confident,
# rare under-confident), each as the LVIS setting it stands for; `benchmarks/bench_premise_regimes.py`
# measures the teacher's Δ per group in each.
REGIMES = {
    "paper": Regime("paper", "the recipes as they are: 40 classes, 300 teacher iterations, uniform sampling "
                    "(repeat threshold 0.001 repeats no image of 425), sigmoid classifier without the federated loss"),
    # 3x the teacher's iterations: at 300 the classification loss is still falling (the benchmark's loss column)
    "long": Regime("long", "the teacher trained 3x longer (900 iterations)", size=(("teacher_iterations", 900),)),
    # more of the LVIS curve: 120 classes (34 rare, 46 common, 40 frequent); the curve needs 1,100
    # training images (frequent classes hold > 100), val and calibration 300 each (>= 5 images of every
    # class); the same 300 teacher iterations, so ~1 epoch instead of ~2.4
    "classes120": Regime("classes120", "120 classes on the LVIS curve (1,100 training images, val and calibration "
                         "300 each), the same 300 teacher iterations",
                         size=(("classes", 120), ("train_images", 1100), ("val_images", 300), ("calib_images", 300))),
    # EVA-02 / ViTDet LVIS: sigmoid + federated loss over 50 of 1,203 classes; here 10 of 40 (the classes of
    # an image, then others drawn by image frequency ** 0.5)
    "federated": Regime("federated", "the federated sigmoid loss (10 of the 40 classes per step, by image "
                        "frequency ** 0.5), as EVA-02's LVIS detectors are trained",
                        overrides=("model.use_federated=true", "model.federated_num_classes=10")),
    # LVIS's repeat-factor sampling at its LVIS strength: t = 0.001 on ~100k images gives a class in
    # k images the repeat factor sqrt(0.001 * 100k / k); 0.25 on the demo's 425 training images gives
    # the same factor to a class with the same k (1 image: 10x; 10 images: 3.2x; 100: 1x)
    "rfs": Regime("rfs", "repeat-factor sampling at LVIS strength (threshold 0.25 on 425 images: a class in 1 "
                  "image 10x, in 10 images 3.2x)", overrides=("data.repeat_threshold=0.25",)),
}


def parse_regime(name: str) -> Regime:
    if name not in REGIMES:
        raise InputError(f"--regime must be one of {', '.join(REGIMES)}, got {name!r}")
    return REGIMES[name]


# the recipe keys that define a student run (each passed explicitly, so its directory name says it all)
STUDENT_KNOBS = ("distill.lam", "distill.threshold", "distill.unsup_weight", "distill.correction_scope",
                 "distill.threshold_on", "distill.ignore_low", "distill.background")


@dataclass(frozen=True)
class TeacherRow:
    key: str
    label: str
    smoothing: str                # none | uniform | similarity
    knobs: tuple[str, ...]        # the recipe keys this row is tuned on


@dataclass(frozen=True)
class StudentRow:
    key: str
    label: str
    targets: str                  # onehot | soft
    corrected: bool               # λ > 0 (the tuned λ) or λ = 0
    unsup_weight: float | None = None  # None: the tuned unlabeled-loss weight; 0: no pseudo-label reaches the loss

    def setting(self, chosen: Mapping[str, Any]) -> dict[str, Any]:
        """This row's student setting, from the grid's chosen one."""
        setting = {**chosen, "distill.lam": chosen.get("distill.lam", 0.0) if self.corrected else 0.0}
        if self.unsup_weight is not None:
            setting["distill.unsup_weight"] = self.unsup_weight
        return setting


TEACHERS = {
    "onehot": TeacherRow("onehot", "Supervised, one-hot", "none", ()),
    "uniform": TeacherRow("uniform", "Supervised + uniform smoothing", "uniform", ("smoothing.epsilon",)),
    "similarity": TeacherRow("similarity", "Supervised + similarity smoothing", "similarity",
                             ("smoothing.epsilon", "smoothing.gamma", "smoothing.temperature")),
}
STUDENTS = {
    # the control: the students' fine-tuning (same iterations, learning rate, labeled batches) with the
    # unlabeled loss weighted 0, so the rows below it differ from it only by the pseudo-labels
    "control": StudentRow("control", "Control: similarity teacher fine-tuned as the students, no pseudo-labels",
                          "soft", True, unsup_weight=0.0),
    "onehot": StudentRow("onehot", "Semi-supervised, one-hot pseudo-labels", "onehot", False),
    "soft": StudentRow("soft", "+ soft pseudo-labels", "soft", False),
    "calibrated": StudentRow("calibrated", "+ soft pseudo-labels + calibration correction", "soft", True),
}


def recipe_defaults(keys: tuple[str, ...] | list[str], recipe_name: str) -> dict[str, Any]:
    """The packaged recipe's values of `keys` (e.g. 'distill.threshold'), in the given order; keys the
    recipe does not have (an option not built yet) are left out."""
    from slsd_cli import recipe

    loaded = recipe.load(recipe_name)
    out = {}
    for key in keys:
        section, _, name = key.partition(".")
        holder = getattr(loaded, section, None)
        if holder is not None and hasattr(holder, name):
            out[key] = getattr(holder, name)
    return out


def format_value(value: Any) -> str:
    """A value as a recipe override spells it (None -> null, 1.0 -> 1, 0.05 -> 0.05)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def overrides(setting: Mapping[str, Any]) -> list[str]:
    """`key=value` recipe overrides of a setting."""
    return [f"{key}={format_value(value)}" for key, value in setting.items()]


def slug(setting: Mapping[str, Any]) -> str:
    """A setting as a directory-name fragment, e.g. 'eps0.1_gamma1.5' (empty for no knobs)."""
    parts = []
    for key, value in setting.items():
        if key not in SHORT_NAMES:
            raise InputError(f"no short name for recipe key {key!r}")
        parts.append(f"{SHORT_NAMES[key]}{format_value(value)}")
    return "_".join(parts)


def teacher_run_name(row: TeacherRow, setting: Mapping[str, Any], seed: int) -> str:
    knobs = slug({k: setting[k] for k in row.knobs if k in setting})
    return "_".join(part for part in (f"teacher_{row.key}", knobs, f"seed{seed}") if part)


def student_run_name(targets: str, setting: Mapping[str, Any], teacher_run: str) -> str:
    """A student's directory name: its targets, its setting, and the teacher run it learns from."""
    return "_".join(part for part in (f"student_{targets}", slug(setting)) if part) + f"__from_{teacher_run}"


def default_jobs(many_runs: bool) -> int:
    """Demo steps run at once: 2 for the grid and Table 1 on a CPU machine with >= 2 cores (two
    one-thread trainings side by side: 1.35x the throughput of one two-thread training on 2 cores), else 1 (a GPU
    is not shared between trainings)."""
    import os

    if not many_runs or (os.cpu_count() or 1) < 2:
        return 1
    import torch

    return 1 if torch.cuda.is_available() else 2


def parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise InputError(f"--seeds must be a comma list of integers, got {text!r}") from exc
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds lists a seed twice: {text!r}")
    return seeds


def parse_fractions(text: str) -> list[float]:
    """'0.1,0.25,0.5,1' -> sorted fractions in (0, 1]."""
    try:
        fractions = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise InputError(f"--fractions must be a comma list of numbers in (0, 1], got {text!r}") from exc
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise InputError(f"--fractions must be a comma list of numbers in (0, 1], got {text!r}")
    return fractions
