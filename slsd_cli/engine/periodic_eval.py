"""Evaluation during training (recipe section `eval:`) and the best model so far.

Every `eval.every` iterations and at the last one, every process runs the trained model over its
shard of `eval.annotations`' images through the sharded inference of `slsd eval`
(`inference.predict_to_results`); rank 0 reads the merged detections (`results.read_results`),
scores them with `evaluation.evaluate` (the same numbers as `slsd eval`), appends a record to
RUN/eval.jsonl and, when `eval.metric` beats the best so far (strictly: the earlier of two equal
values stays), exports the model to RUN/best/ with the run's own layout (`phase.export`). The best
value and its iteration are part of the checkpoint (`state_dict`), so a resumed run makes the same
choices as an unbroken one.

RUN/eval.jsonl, one record per evaluation:
    {"iter", "metric", "value", "improved", "best", "best_iter", "seconds" (inference + scoring),
     "bbox": {"AP", "AP50", ...}, "segm": {...} (summaries, without per-class APs), "time", "elapsed"}

All inputs (annotations, image files, the model's categories, the metric's name) are checked by
`build` before training starts, never hours into a run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from slsd_cli import distributed
from slsd_cli.evaluation import metrics as evaluation
from slsd_cli.inference import sharded as inference
from slsd_cli.data import results
from slsd_cli import run_dir as runs
from slsd_cli.data.lvis import Annotations, load_annotations
from slsd_cli.engine.logbook import append_json
from slsd_cli.errors import InputError
from slsd_cli.recipe import Recipe

class PeriodicEval:
    """See the module docstring. Every process holds one and calls `run` at the same iterations."""

    def __init__(self, annotations: Annotations, images: Path, *, every: int, metric: str, max_dets: int,
                 image_size: int, category_ids: list[int], num_workers: int = 0):
        self.annotations, self.images = annotations, images
        self.every, self.metric, self.max_dets = every, metric, max_dets
        self.iou_type, self.key = metric.split("/", 1)
        self.image_size, self.category_ids, self.num_workers = image_size, category_ids, num_workers
        self.best: float | None = None
        self.best_iter: int | None = None

    def due(self, done: int, total: int) -> bool:
        return done % self.every == 0 or done == total

    def state_dict(self) -> dict:
        return {"best": self.best, "best_iter": self.best_iter}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_iter = state.get("best"), state.get("best_iter")

    def run(self, model: torch.nn.Module, export: Callable[[Path], None], run_dir: Path, iteration: int,
            stamp: Callable[[], dict]) -> dict[str, Any]:
        """Evaluate `model` after `iteration`; export it with `export(RUN/best)` if it is the best so far.
        Returns the eval.jsonl record (every process; the scores are rank 0's, broadcast)."""
        started = time.perf_counter()
        out = run_dir / runs.EVAL_DETECTIONS  # inside RUN: every rank sees it
        was_training = model.training
        model.eval()
        with torch.no_grad():
            inference.predict_to_results(model, self.annotations, self.images, out, image_size=self.image_size,
                                         max_dets=self.max_dets, category_ids=self.category_ids,
                                         num_workers=self.num_workers, description=f"eval @{iteration}")
        model.train(was_training)
        summary = None
        if distributed.is_main():
            detections = results.read_results(out, self.annotations)
            metrics = evaluation.evaluate(self.annotations, detections, iou_types=evaluation.IOU_TYPES,
                                          max_dets=self.max_dets, path=out)
            out.unlink()
            summary = {t: {k: v for k, v in metrics[t].items() if k != "per_class"} for t in evaluation.IOU_TYPES}
        summary = distributed.broadcast_object(summary)
        value = float(summary[self.iou_type][self.key])
        improved = self.best is None or value > self.best
        if improved:
            self.best, self.best_iter = value, iteration
        record = {"iter": iteration, "metric": self.metric, "value": value, "improved": improved,
                  "best": self.best, "best_iter": self.best_iter,
                  "seconds": round(time.perf_counter() - started, 3), **summary, **stamp()}
        if distributed.is_main():
            if improved:
                export(runs.best_dir(run_dir))
            append_json(runs.eval_path(run_dir), record)
        distributed.barrier()
        return record


def build(recipe: Recipe, categories: list[dict]) -> PeriodicEval | None:
    """The evaluator of `recipe.eval` for a model of `categories` (None when eval.every is 0), with
    every input checked now."""
    cfg = recipe.eval
    if cfg.every == 0:
        return None
    annotations = load_annotations(cfg.annotations)
    images = Path(cfg.images) if cfg.images is not None else Path(cfg.annotations).parent / "images"
    if not images.is_dir():
        raise InputError("evaluation image folder not found (set eval.images)", path=images)
    keys = evaluation.summary_keys(annotations.protocol, cfg.max_dets)
    iou_type, key = cfg.metric.split("/", 1)
    if key not in keys:
        raise InputError(f"eval.metric {cfg.metric!r}: {annotations.protocol.upper()} reports "
                         f"{', '.join(f'{iou_type}/{k}' for k in keys)}", record="recipe")
    category_ids = [c["id"] for c in categories]
    unknown = [c for c in category_ids if c not in annotations.category_index]
    if unknown:
        raise InputError(f"the model's category id {unknown[0]} is not in the evaluation annotations "
                         f"({len(unknown)} such ids)", path=annotations.path)
    for image_id in annotations.image_ids:
        if not annotations.image_file(image_id, images).is_file():
            raise InputError("evaluation image not found", path=annotations.image_file(image_id, images),
                             record=f"image id {image_id}")
    return PeriodicEval(annotations, images, every=cfg.every, metric=cfg.metric, max_dets=cfg.max_dets,
                        image_size=recipe.model.image_size, category_ids=category_ids,
                        num_workers=recipe.data.num_workers)
