"""The distillation phase (paper §3.2): a student learns from labeled images and from the EMA
teacher's pseudo-labels on unlabeled images, through the one training loop of `engine.trainer`.

Per iteration and process (`DistillPhase`, a `trainer.Phase`):

1. `next_batch`: one labeled micro-batch (LSJ, repeat-factor sampling, the teacher's class-similarity
   smoothing as `class_targets`) and one unlabeled micro-batch of (weak, strong) pairs from
   `WeakStrongTransform`: the same geometry, the strong view adding colour jitter, grayscale, blur
   and erasing. Labeled : unlabeled is 1 : 1 (`distill.unlabeled_per_process`, default
   `train.batch_per_process`).
2. `losses`: the EMA teacher (eval mode, no gradient) detects on the weak view; its detections above
   `distill.threshold` become pseudo-labels (`labels.pseudo_labels`: box, mask binarised at 0.5,
   one-hot / soft / Eq. 5-corrected soft class target). The student then runs *once* on the labeled
   images and the strong views together; each pseudo-labeled image carries
   `loss_weight = distill.unsup_weight`, so the RPN, cascade classification / regression and mask
   losses of an unlabeled image are scaled by it (the detector's normalisers count every image of the
   batch: with 1:1 and weight 1 labeled and unlabeled images weigh the same, the paper's "equal
   weighting"). An image without pseudo-labels is a background-only image (G = 0), which the detector
   handles without NaN.
3. `after_step`: teacher <- EMA of the student (`engine.ema`, decay `distill.ema`).

Both networks start from the teacher run's weights. The checkpoint (`RUN/ckpt/last.pt`) holds
student and teacher (`modules()`), the optimiser, both data positions and the EMA update count, so
`--resume` continues bit-for-bit. At the end the run directory holds the student as
`RUN/model.safetensors` + `RUN/model.json` and the teacher as `RUN/teacher/model.safetensors` +
`RUN/teacher/model.json` (the same layout, so `slsd eval` can load either).

Logged per log window (metrics.jsonl): pseudo-labels per image (all, and per r/c/f group of the
detected class), the mean teacher confidence of the pseudo-labels, the share of unlabeled images
without any, the EMA decay and update count.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch
from torch import Tensor, nn

from slsd_cli import distributed
from slsd_cli import run_dir as runs
from slsd_cli.typed_yaml import to_dict
from slsd_cli.data.batching import Batch, collate_pairs
from slsd_cli.data.dataset import InstanceDataset
from slsd_cli.data.lvis import FREQUENCY_GROUPS, Annotations, frequency_group, load_annotations
from slsd_cli.data.transforms import WeakStrongTransform
from slsd_cli.engine.ema import EMATeacher
from slsd_cli.labels.pseudo_labels import PseudoLabelSpec, PseudoLabelStats, pseudo_label_targets
from slsd_cli.engine.labeled import add_class_targets, build_labeled_stream, build_table
from slsd_cli.engine.launch import launch
from slsd_cli.engine.seeding import UNLABELED_STREAM, sample_seed, seed_everything
from slsd_cli.engine.stream import StepLoader
from slsd_cli.engine.trainer import TrainResult
from slsd_cli.errors import InputError
from slsd_cli.io import read_json
from slsd_cli.progress import info, warn
from slsd_cli.recipe import Recipe, SmoothingMode



@dataclass
class DistillBatch:
    """One micro-batch: labeled images with their targets, and the weak / strong views of the
    unlabeled images (same geometry; their annotations, if any, are never used)."""

    labeled: Batch
    weak: Batch
    strong: Batch


def join_batches(first: tuple[Tensor, list, list[dict]], second: tuple[Tensor, list, list[dict]]
                 ) -> tuple[Tensor, list[tuple[int, int]], list[dict]]:
    """Concatenate two padded batches (images, image_sizes, targets), padding to the larger size."""
    a, sizes_a, targets_a = first
    b, sizes_b, targets_b = second
    height, width = max(a.shape[-2], b.shape[-2]), max(a.shape[-1], b.shape[-1])
    if a.shape[-2:] == b.shape[-2:]:
        images = torch.cat([a, b])
    else:
        images = a.new_zeros((a.shape[0] + b.shape[0], 3, height, width))
        images[:a.shape[0], :, :a.shape[-2], :a.shape[-1]] = a
        images[a.shape[0]:, :, :b.shape[-2], :b.shape[-1]] = b
    return images, list(sizes_a) + list(sizes_b), list(targets_a) + list(targets_b)


class DistillPhase:
    """Teacher-student distillation with an EMA teacher; see the module docstring and
    `engine.trainer.Phase`."""

    find_unused_parameters = False

    def __init__(self, student: nn.Module, ema: EMATeacher, labeled: StepLoader, unlabeled: StepLoader,
                 table: Tensor | None, spec: PseudoLabelSpec, unsup_weight: float, categories: list[dict],
                 recipe: Recipe, provenance: dict | None = None):
        self.student = student
        self.trainable = student
        self.ema = ema
        self.labeled = labeled
        self.unlabeled = unlabeled
        self.table = table
        self.spec = spec
        self.unsup_weight = float(unsup_weight)
        self.categories = categories
        self.groups = [category_group(c) for c in categories]
        self.recipe = recipe
        self.provenance = provenance or {}
        self.stats = PseudoLabelStats()

    # ---- trainer.Phase
    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.ema.teacher}

    def next_batch(self) -> DistillBatch:
        labeled = self.labeled.next()
        if self.table is not None:
            add_class_targets(labeled, self.table)
        weak, strong = self.unlabeled.next()
        return DistillBatch(labeled, weak, strong)

    def pseudo_labels(self, batch: DistillBatch) -> tuple[list[dict], PseudoLabelStats]:
        """The teacher's pseudo-labels for the strong views of `batch` (no gradient)."""
        teacher = self.ema.teacher
        # detections under the spec's score floor (threshold, ignore band, Eq. 5 shift) are never used:
        # let predict drop them before NMS and the mask head (NMS only lets higher scores suppress lower ones)
        threshold = max(teacher.cfg.test_score_threshold, self.spec.score_floor())
        detections = teacher.predict(batch.weak.images, batch.weak.image_sizes, score_threshold=threshold)
        return pseudo_label_targets(detections, batch.strong.image_sizes, self.spec, groups=self.groups)

    def losses(self, model: nn.Module, batch: DistillBatch) -> dict[str, Tensor]:
        pseudo, stats = self.pseudo_labels(batch)
        self.stats.add(stats)
        scorers = [None] * len(pseudo)
        if self.spec.background == "teacher":  # soft background: the teacher scores the student's RoIs
            scorers = self.ema.teacher.background_scorers(batch.weak.images, batch.weak.image_sizes)
        unlabeled_targets = [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"],
                              "class_targets": t["class_targets"], "ignore_boxes": t["ignore_boxes"],
                              "background_scorer": scorer, "loss_weight": self.unsup_weight}
                             for t, scorer in zip(pseudo, scorers)]
        images, sizes, targets = join_batches(
            (batch.labeled.images, batch.labeled.image_sizes, batch.labeled.targets),
            (batch.strong.images, batch.strong.image_sizes, unlabeled_targets))
        return model(images, sizes, targets)

    def after_step(self, iteration: int) -> None:
        self.ema.update(self.student)

    def log_stats(self) -> dict[str, float]:
        """Pseudo-label figures since the last call, summed over processes (every rank calls this)."""
        values = self.stats.as_tensor().to(next(self.student.parameters()).device)  # nccl reduces on the GPU
        values = distributed.all_reduce_sum(values).cpu()
        self.stats = PseudoLabelStats()
        return {**PseudoLabelStats.from_tensor(values).summary(), "ema_decay": self.ema.decay,
                "ema_updates": self.ema.updates}

    def state_dict(self) -> dict:
        return {"labeled": self.labeled.state_dict(), "unlabeled": self.unlabeled.state_dict(),
                "ema_updates": self.ema.updates, "stats": self.stats.as_tensor()}

    def load_state_dict(self, state: dict) -> None:
        self.labeled.load_state_dict(state["labeled"])
        self.unlabeled.load_state_dict(state["unlabeled"])
        self.ema.updates = int(state["ema_updates"])
        self.stats = PseudoLabelStats.from_tensor(state["stats"])

    def export(self, out_dir: Path) -> None:
        from slsd_cli.model.weights import save_detector

        extra = {"recipe": to_dict(self.recipe), **self.provenance}
        save_detector(self.student, out_dir, self.categories, self.recipe.model,
                      extra={"phase": "student", **extra})
        save_detector(self.ema.teacher, runs.teacher_dir(out_dir), self.categories, self.recipe.model,
                      extra={"phase": "ema_teacher", "ema_decay": self.ema.decay, "ema_updates": self.ema.updates,
                             **extra})

    def close(self) -> None:
        self.labeled.close()
        self.unlabeled.close()


def category_group(category: dict) -> str:
    """r/c/f of a category: its `frequency` field, else from its `image_count` (else 'f')."""
    group = category.get("frequency")
    if group in FREQUENCY_GROUPS:
        return group
    if "image_count" in category:
        return frequency_group(int(category["image_count"]))
    return "f"


# ------------------------------------------------------------------------------ set-up


def unlabeled_per_process(recipe: Recipe) -> int:
    """Unlabeled images per process per iteration (default: as many as labeled, 1:1)."""
    d = recipe.distill
    return recipe.train.batch_per_process if d.unlabeled_per_process is None else d.unlabeled_per_process


def validate(recipe: Recipe) -> None:
    """What a distillation run needs beyond a valid recipe (`recipe.load` has checked every key's
    range): its inputs, unlabeled images that split into the micro-batches, and Δ for Eq. 5."""
    d, t = recipe.distill, recipe.train
    accumulation = t.batch_per_process // t.micro_batch
    checks = [
        (d.teacher is not None, "no teacher: pass --checkpoint RUN (distill.teacher)"),
        (d.unlabeled is not None, "no unlabeled images: pass --unlabeled unlabeled.json (distill.unlabeled)"),
        (unlabeled_per_process(recipe) % accumulation == 0,
         f"distill.unlabeled_per_process must be a multiple of train.batch_per_process / "
         f"train.micro_batch = {accumulation}"),
        (d.targets == "onehot" or d.lam == 0.0 or d.calibration is not None,
         f"soft targets with λ = {d.lam} need --calibration calibration.json (from `slsd calibrate`); "
         "or pass --lambda 0 (plain soft targets)"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message, record="recipe")


def teacher_meta_path(teacher: str | Path) -> Path:
    """model.json of a teacher given as a run dir, its model.safetensors or its model.json."""
    from slsd_cli.model.weights import model_files

    return model_files(runs.resolve_model(teacher))[1]


def inherit_from_teacher(recipe: Recipe, teacher_meta: dict, meta_path: str | Path = "model.json"
                         ) -> tuple[Recipe, list[str]]:
    """Fill what the distill recipe leaves open (null) from the teacher run's recipe: the labeled
    data (`data.train_json`, `data.images`), the smoothing prototypes, and with `smoothing.mode`
    null the whole smoothing section (mode, ε, γ, τ: the labeled images keep their teacher's
    targets). Returns the new recipe and the keys taken."""
    teacher_recipe = (teacher_meta.get("extra") or {}).get("recipe") or {}
    taken = []
    data, smoothing = recipe.data, recipe.smoothing
    t_data = teacher_recipe.get("data") or {}
    t_smoothing = teacher_recipe.get("smoothing") or {}
    if smoothing.mode is None:
        if t_smoothing.get("mode") not in get_args(SmoothingMode):
            raise InputError("smoothing.mode is null (the teacher's smoothing) but the teacher run does not record "
                             f"its smoothing; pass --smoothing {'|'.join(get_args(SmoothingMode))}", path=meta_path)
        keys = ("mode", "epsilon", "gamma", "temperature", "prototypes")
        inherited = {k: t_smoothing[k] for k in keys if k in t_smoothing}
        inherited.setdefault("temperature", 1.0)  # a run from before τ existed: the paper's Eq. 2
        if smoothing.prototypes is not None:  # an explicit --prototypes still wins
            inherited.pop("prototypes", None)
        smoothing = dataclasses.replace(smoothing, **inherited)
        taken += [f"smoothing.{k}" for k in inherited]
    if data.train_json is None and t_data.get("train_json"):
        data = dataclasses.replace(data, train_json=t_data["train_json"])
        taken.append("data.train_json")
    same_images = data.train_json is not None and data.train_json == t_data.get("train_json")
    if data.images is None and same_images and t_data.get("images"):  # the teacher's folder for its json
        data = dataclasses.replace(data, images=t_data["images"])
        taken.append("data.images")
    if smoothing.mode == "similarity" and smoothing.prototypes is None and t_smoothing.get("prototypes") \
            and "smoothing.prototypes" not in taken:
        smoothing = dataclasses.replace(smoothing, prototypes=t_smoothing["prototypes"])
        taken.append("smoothing.prototypes")
    return dataclasses.replace(recipe, data=data, smoothing=smoothing), taken


def load_teacher(recipe: Recipe, device: torch.device) -> tuple[nn.Module, dict]:
    """The student, built from the recipe's `model:` section (`run` has checked that it is the
    teacher's network: `weights.check_same_network`) and loaded with the teacher run's weights."""
    from slsd_cli.model.weights import build_detector, load_detector

    source = Path(recipe.distill.teacher)
    teacher_model, meta = load_detector(source, device="cpu")
    # no backbone download or weights file: every tensor comes from the teacher run
    student = build_detector(dataclasses.replace(recipe.model, pretrained=False, weights=None, init_from=None),
                             meta["categories"])
    own, theirs = student.state_dict(), teacher_model.state_dict()
    mismatch = sorted(set(own) ^ set(theirs)) or [k for k in own if own[k].shape != theirs[k].shape]
    if mismatch:
        raise InputError(f"the recipe's model: section does not describe the teacher's network (first difference: "
                         f"{mismatch[0]}); copy the teacher's model settings (its model.json) into the recipe",
                         path=source)
    student.load_state_dict(theirs)
    del teacher_model
    return student.to(device), meta


def unlabeled_images_dir(recipe: Recipe, annotations: Annotations) -> Path:
    """The unlabeled images' folder: distill.unlabeled_images, else the folder `slsd retrieve`
    recorded in the json (`info.images_dir`; a relative one is tried from the working directory,
    then from the json's folder), else images/ beside the json."""
    d = recipe.distill
    if d.unlabeled_images is not None:
        images = Path(d.unlabeled_images)
    else:
        info_doc = annotations.data.get("info")
        recorded = info_doc.get("images_dir") if isinstance(info_doc, dict) else None
        beside = Path(d.unlabeled).parent
        if recorded:
            images = Path(recorded)
            if not images.is_absolute() and not images.is_dir():
                images = beside / recorded
        else:
            images = beside / "images"
    if not images.is_dir():
        raise InputError("unlabeled image folder not found (pass --unlabeled-images DIR)", path=images)
    return images


def build_unlabeled(recipe: Recipe, dist: distributed.DistInfo, micro_batch: int) -> StepLoader:
    d, data = recipe.distill, recipe.data
    annotations = load_annotations(d.unlabeled, require_annotations=False)
    images = unlabeled_images_dir(recipe, annotations)
    if annotations.annotations:
        info(f"{d.unlabeled}: its {len(annotations.annotations)} annotations are ignored (unlabeled images)")
    dataset = InstanceDataset(annotations, images, WeakStrongTransform(data.image_size, tuple(data.scale_range)))
    if len(dataset) == 0:
        raise InputError("no unlabeled images", path=d.unlabeled)
    seed = sample_seed(recipe.train.seed, UNLABELED_STREAM) & 0xFFFFFFFF
    return StepLoader(dataset, functools.partial(collate_pairs, pad_to=data.image_size), seed=seed,
                      rank=dist.rank, world_size=dist.world_size, micro_batch=micro_batch, factors=None,
                      num_workers=data.num_workers, device=dist.device)


def build_spec(recipe: Recipe, categories: list[dict]) -> PseudoLabelSpec:
    d = recipe.distill
    delta = None
    if d.targets == "soft" and d.calibration is not None:
        from slsd_cli.labels.calibration import load_delta

        delta = load_delta(d.calibration, [c["id"] for c in categories])
    elif d.calibration is not None:
        warn("--calibration is unused with one-hot targets")
    try:
        return PseudoLabelSpec(targets=d.targets, threshold=d.threshold, lam=d.lam, scope=d.correction_scope,
                               delta=delta, mask_threshold=d.mask_threshold, threshold_on=d.threshold_on,
                               ignore_low=d.ignore_low, background=d.background)
    except ValueError as exc:
        raise InputError(f"distill: {exc}", record="recipe") from None


def build_phase(recipe: Recipe, dist: distributed.DistInfo) -> DistillPhase:
    """Everything the loop needs, on this process's device, every input checked (every process calls this)."""
    seed_everything(recipe.train.seed)
    student, meta = load_teacher(recipe, dist.device)
    categories = meta["categories"]
    annotations = load_annotations(recipe.data.train_json)
    if annotations.category_ids != [c["id"] for c in categories]:
        raise InputError(f"the labeled set's {annotations.num_classes} categories differ from the teacher's "
                         f"{len(categories)} (ids, in order)", path=annotations.path)
    table = build_table(recipe, annotations)
    ema = EMATeacher(student, recipe.distill.ema)
    labeled = build_labeled_stream(recipe, annotations, dist)
    accumulation = recipe.train.batch_per_process // recipe.train.micro_batch
    unlabeled = build_unlabeled(recipe, dist, unlabeled_per_process(recipe) // accumulation)
    provenance = {"teacher": str(recipe.distill.teacher), "unlabeled": str(recipe.distill.unlabeled),
                  "calibration": None if recipe.distill.calibration is None else str(recipe.distill.calibration)}
    return DistillPhase(student, ema, labeled, unlabeled, None if table is None else table.to(dist.device),
                        build_spec(recipe, categories), recipe.distill.unsup_weight, categories, recipe, provenance)


def describe(phase: DistillPhase, dist: distributed.DistInfo) -> str:
    recipe = phase.recipe
    d = recipe.distill
    targets = "onehot" if d.targets == "onehot" else \
        f"soft, calibrated (λ={d.lam}, scope {d.correction_scope})" if phase.spec.corrects else "soft"
    ignore = "off" if d.ignore_low is None else f"[{d.ignore_low}, {d.threshold}]"
    return (f"distill: {len(phase.categories)} classes, {len(phase.labeled.dataset)} labeled + "
            f"{len(phase.unlabeled.dataset)} unlabeled images, {recipe.train.iterations} iterations x "
            f"({recipe.train.batch_per_process} + {unlabeled_per_process(recipe)}) images x {dist.world_size} "
            f"process(es), targets {targets}, threshold {d.threshold} on the {d.threshold_on} score, "
            f"ignore band {ignore}, background {d.background}, EMA {d.ema}, device {dist.device}")


def run(recipe: Recipe, run_dir: str | Path, *, resume: bool = False, force: bool = False) -> TrainResult:
    """Distil the teacher run `recipe.distill.teacher` into a student, into `run_dir` (every torchrun
    process calls this)."""
    validate(recipe)
    meta_path = teacher_meta_path(recipe.distill.teacher)
    teacher_meta = read_json(meta_path)
    if not isinstance(teacher_meta, dict):
        raise InputError("not an slsd detector description", path=meta_path)
    if not isinstance(teacher_meta.get("model"), dict):
        raise InputError("'model' must be an object (the model: section of the recipe)", path=meta_path)
    from slsd_cli.model.weights import check_same_network

    # the student is the teacher's network, normalisation included (before the run dir is touched)
    check_same_network(recipe.model, teacher_meta, meta_path)
    recipe, taken = inherit_from_teacher(recipe, teacher_meta, meta_path)
    if recipe.data.train_json is None:
        raise InputError("no labeled annotations: set data.train_json or pass --train-json", record="recipe")
    if taken:
        info(f"from the teacher run's recipe: {', '.join(taken)}")
    return launch(recipe, run_dir, build_phase, resume=resume, force=force, outputs=runs.DISTILL_OUTPUTS,
                  describe=describe)
