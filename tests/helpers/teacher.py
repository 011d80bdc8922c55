"""A tiny teacher run for `slsd distill` tests: a random-init detector made confident by its
classifier biases, so the real `predict` -> pseudo-label -> student path gets pseudo-labels on every
image (a trained teacher would take minutes to make)."""

from __future__ import annotations

from pathlib import Path

import torch


def confident_teacher(out: Path, train_json: Path, overrides: list[str], biases: dict[int, float]) -> list[int]:
    """Save at `out` the teacher run of `slsd distill synthetic_tiny_distill *overrides` (seed 0)
    whose classifier bias of class index i is `biases[i]` in every cascade stage (e.g. {0: 3.0}:
    class 0 everywhere). Returns the category ids in the model's order."""
    from slsd_cli import recipe as recipes
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.model.weights import build_detector, save_detector
    from slsd_cli.typed_yaml import to_dict

    # a teacher run records the smoothing it trained with (the distill recipe's null means "the teacher's")
    recipe = recipes.load("synthetic_tiny_distill", ["smoothing.mode=none", *overrides,
                                                     f"data.train_json={train_json}"])
    annotations = load_annotations(train_json)
    torch.manual_seed(0)
    teacher = build_detector(recipe.model, annotations.categories)
    with torch.no_grad():
        for stage in teacher.roi_heads.stages:
            for index, value in biases.items():
                stage.cls_score.bias[index] = value
    save_detector(teacher, out, annotations.categories, recipe.model,
                  extra={"phase": "teacher", "recipe": to_dict(recipe)})
    return [c["id"] for c in annotations.categories]
