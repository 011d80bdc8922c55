"""The tiny recipe learns: through `slsd train-teacher` on the embedded benchmark (64-pixel synth
images, 16 training images, 60 iterations of 2 images; about a minute on 2 shared cores), the loss
falls and the average precision on the training images, scored as `slsd eval` scores (slsd's
LVIS evaluator: class-aware, every score counted), goes from 0 for the initial model to a bbox
AP50 >= 0.1 (0.144 measured; AP 0.057). Recall at a low score threshold would not do: a model that
only finds objects, whatever their class, scores well on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from slsd_cli import recipe as recipes
from slsd_cli.cli import main
from slsd_cli.data.lvis import load_annotations
from slsd_cli.engine.seeding import seed_everything
from slsd_cli.evaluation.metrics import evaluate
from slsd_cli.inference.sharded import predict_to_results
from slsd_cli.data.results import read_results
from slsd_cli.model.weights import build_detector, load_detector
from tests.helpers.synth import first_annotated, linked_copy

SIZE = 64


@pytest.fixture(scope="module")
def train16(synth_data, tmp_path_factory) -> Path:
    shared = synth_data(classes=4, train_images=255, val_images=20, pool_images=1, image_size=SIZE, seed=0)
    root = linked_copy(shared, tmp_path_factory.mktemp("synth_learn"))
    return first_annotated(shared / "train.json", root / "train16.json", 16)


def average_precision(model, categories: list[dict], annotations_path: Path, out: Path) -> dict:
    """bbox metrics of `model` on the annotations' images, as `slsd eval` computes them (the
    sharded inference into a results file, then slsd's LVIS/COCO evaluator)."""
    annotations = load_annotations(annotations_path)
    predict_to_results(model, annotations, annotations_path.parent / "images", out, image_size=SIZE,
                       category_ids=[c["id"] for c in categories])
    return evaluate(annotations, read_results(out, annotations, masks=False), iou_types=("bbox",))


def test_tiny_recipe_learns(train16: Path, tmp_path: Path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: one thread is faster
    try:
        run = tmp_path / "run"
        args = ["train-teacher", "synthetic_tiny", f"data.image_size={SIZE}", f"model.image_size={SIZE}",
                "train.batch_per_process=2", "train.micro_batch=2", "train.lr=0.001", "train.warmup_iters=10",
                "train.log_every=10", "train.checkpoint_every=1000", "--train-json", str(train16),
                "--iterations", "60", "--out-dir", str(run)]
        assert main(args) == 0
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        first, last = lines[0], lines[-1]
        assert (first["iter"], last["iter"]) == (10, 60)
        assert last["loss"] < 0.9 * first["loss"]
        assert last["losses"]["rpn_cls"] < 0.25 * first["losses"]["rpn_cls"]
        assert last["losses"]["mask"] < first["losses"]["mask"]

        trained, meta = load_detector(run)
        recipe = recipes.load("synthetic_tiny", [f"model.image_size={SIZE}"])
        seed_everything(recipe.train.seed)
        initial = build_detector(recipe.model, meta["categories"]).eval()
        before = average_precision(initial, meta["categories"], train16, tmp_path / "initial.json")
        after = average_precision(trained, meta["categories"], train16, tmp_path / "trained.json")
        # measured: initial bbox AP 0.0 / AP50 0.0; trained AP 0.057 / AP50 0.144 (masks need longer)
        assert before["bbox"]["AP50"] < 0.02 and before["bbox"]["AP"] < 0.01
        assert after["bbox"]["AP50"] >= 0.1 and after["bbox"]["AP"] >= 0.03, (before["bbox"], after["bbox"])
    finally:
        torch.set_num_threads(threads)
