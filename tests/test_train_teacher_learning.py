"""The tiny recipe learns: through `slsd train-teacher` on the embedded benchmark (64-pixel synth
images, 16 training images, 60 iterations of 2 images; about a minute on 2 shared cores), the loss
falls and the recall of the training objects at IoU 0.5 (right class, score >= 0.05) goes from
about 0 for the initial model to at least 0.5 (0.74 measured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from slsd_cli import recipe as recipes
from slsd_cli.cli import main
from slsd_cli.data.batching import collate
from slsd_cli.data.dataset import InstanceDataset
from slsd_cli.data.lvis import load_annotations, recount_categories
from slsd_cli.data.synthetic import generate
from slsd_cli.data.transforms import test_transform
from slsd_cli.engine.trainer import seed_everything
from slsd_cli.model.weights import build_detector, load_detector

SIZE = 64


@pytest.fixture(scope="module")
def train16(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_learn")
    generate(root, classes=4, train_images=255, val_images=20, pool_images=1, image_size=SIZE, seed=0)
    data = json.loads((root / "train.json").read_text())
    keep = set(sorted({a["image_id"] for a in data["annotations"]})[:16])
    subset = recount_categories({**data, "images": [i for i in data["images"] if i["id"] in keep],
                                 "annotations": [a for a in data["annotations"] if a["image_id"] in keep]})
    (root / "train16.json").write_text(json.dumps(subset))
    return root / "train16.json"


def recall_at_50(model, annotations_path: Path) -> float:
    """Fraction of ground-truth objects hit by a detection of their class at IoU >= 0.5."""
    annotations = load_annotations(annotations_path)
    dataset = InstanceDataset(annotations, annotations_path.parent / "images", test_transform(SIZE))
    hits = total = 0
    for i in range(len(dataset)):
        batch = collate([dataset[i]], pad_to=SIZE)
        pred = model.predict(batch.images, batch.image_sizes)[0]
        gt = batch.targets[0]
        keep = pred["scores"] >= 0.05
        total += len(gt["boxes"])
        if len(gt["boxes"]) and bool(keep.any()):
            iou = box_iou(gt["boxes"], pred["boxes"][keep])
            same_class = gt["labels"][:, None] == pred["labels"][keep][None, :]
            hits += int(((iou * same_class).max(dim=1).values >= 0.5).sum())
    return hits / total


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
        before, after = recall_at_50(initial, train16), recall_at_50(trained, train16)
        assert before < 0.2
        assert after >= 0.5, (before, after)
    finally:
        torch.set_num_threads(threads)
