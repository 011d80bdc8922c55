"""How the distillation phase wires its parts together, on a phase built as `slsd distill` builds it
(`engine.distill.build_phase`, a tiny random-init teacher made confident, the shared tiny synth set):

- the teacher is given the weak views (`torch.equal`), the student the strong ones;
- every unlabeled target carries `distill.unsup_weight`, no labeled one does;
- with smoothing on (`smoothing.*` in the distill recipe), each labeled ground truth's class target
  is its class's row of the smoothing table (Eq. 2-3);
- the recipe's `distill.mask_threshold` reaches the pseudo-labels, and binarises their masks."""

from __future__ import annotations

import pytest
import torch

from slsd_cli import recipe as recipes
from slsd_cli.distributed import DistInfo
from slsd_cli.engine import distill
from slsd_cli.labels.pseudo_labels import PseudoLabelSpec, pseudo_label_targets
from slsd_cli.labels.smoothing import cosine_similarity, save_prototypes, similarity_targets
from tests.helpers.teacher import confident_teacher

FAST = ["data.image_size=64", "model.image_size=64", "model.max_detections=3", "model.rpn_post_nms_topk_train=64",
        "model.rpn_post_nms_topk_test=64", "model.rois_per_image=32", "model.fpn_channels=32",
        "model.box_head_fc_dim=128", "model.mask_head_channels=32"]
EPSILON, GAMMA, UNSUP_WEIGHT, MASK_THRESHOLD = 0.3, 1.0, 0.25, 0.3
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wired(tiny_synth, tmp_path_factory):
    """(phase, one batch, the expected smoothing table [C, C])."""
    root = tmp_path_factory.mktemp("wiring")
    train_json = tiny_synth / "train.json"
    ids = confident_teacher(root / "teacher", train_json, FAST, {0: 3.0})
    prototypes = torch.tensor([[1.0, 0.0, 0.2], [0.8, 0.6, 0.0], [0.0, 0.3, 1.0]], dtype=torch.float64)
    counts = torch.tensor([40, 3, 12])
    similarity = cosine_similarity(prototypes)
    save_prototypes(root / "prototypes.safetensors", prototypes, counts, similarity, ids)
    recipe = recipes.load("synthetic_tiny_distill", [
        *FAST, f"data.train_json={train_json}", f"distill.teacher={root / 'teacher'}",
        f"distill.unlabeled={tiny_synth / 'pool.json'}", "distill.lam=0", "data.num_workers=0",
        "train.batch_per_process=2", "train.micro_batch=2", "smoothing.mode=similarity",
        f"smoothing.prototypes={root / 'prototypes.safetensors'}", f"smoothing.epsilon={EPSILON}",
        f"smoothing.gamma={GAMMA}", f"distill.unsup_weight={UNSUP_WEIGHT}",
        f"distill.mask_threshold={MASK_THRESHOLD}"])
    phase = distill.build_phase(recipe, CPU)
    try:
        batch = phase.next_batch()
        yield phase, batch, similarity_targets(similarity, counts, EPSILON, GAMMA)
    finally:
        phase.close()


def test_labeled_targets_are_the_smoothing_tables_rows(wired):
    phase, batch, table = wired
    assert not torch.allclose(table, torch.eye(3), atol=0.05)  # really smoothed: one-hot would fail
    seen = 0
    for target in batch.labeled.targets:
        rows = table.index_select(0, target["labels"])
        torch.testing.assert_close(target["class_targets"], rows, atol=1e-6, rtol=0)
        seen += len(target["labels"])
    assert seen > 0


def test_teacher_sees_the_weak_view_student_the_strong_one_and_unlabeled_targets_the_weight(wired, monkeypatch):
    phase, batch, table = wired
    assert not torch.equal(batch.weak.images, batch.strong.images)  # the two views differ
    teacher_inputs, student_inputs = [], []
    real_predict = phase.ema.teacher.predict

    def predict(images, *args, **kwargs):
        teacher_inputs.append(images.clone())
        return real_predict(images, *args, **kwargs)

    def student(images, sizes, targets):
        student_inputs.append((images.clone(), list(sizes), targets))
        return {"loss": images.new_zeros(())}

    monkeypatch.setattr(phase.ema.teacher, "predict", predict)
    phase.losses(student, batch)
    assert len(teacher_inputs) == 1 and torch.equal(teacher_inputs[0], batch.weak.images)
    images, sizes, targets = student_inputs[0]
    n_labeled = len(batch.labeled.targets)
    assert torch.equal(images[:n_labeled], batch.labeled.images)
    assert torch.equal(images[n_labeled:], batch.strong.images)
    assert sizes[n_labeled:] == list(batch.strong.image_sizes)
    unlabeled = targets[n_labeled:]
    assert len(unlabeled) == len(batch.strong.targets) > 0
    assert all(t["loss_weight"] == UNSUP_WEIGHT for t in unlabeled)
    assert sum(len(t["boxes"]) for t in unlabeled) > 0  # the confident teacher gave pseudo-labels
    assert all(float(t.get("loss_weight", 1.0)) == 1.0 for t in targets[:n_labeled])
    for t in targets[:n_labeled]:  # the labeled targets reach the student smoothed
        torch.testing.assert_close(t["class_targets"], table.index_select(0, t["labels"]), atol=1e-6, rtol=0)


def test_the_recipes_mask_threshold_binarises_the_pseudo_masks(wired):
    phase = wired[0]
    assert phase.spec.mask_threshold == MASK_THRESHOLD
    # a 28 x 28 mask whose column j holds (j + 0.5) / 28, pasted into a 28-pixel box: column j is the
    # object when (j + 0.5) / 28 > threshold (no column sits on 0.3, 0.5 or 0.7)
    ramp = ((torch.arange(28) + 0.5) / 28).expand(28, 28)
    det = {"boxes": torch.tensor([[0.0, 0.0, 28.0, 28.0]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([0]), "probs": torch.tensor([[0.9, 0.05, 0.05]]), "mask_probs": ramp[None]}
    for threshold, columns in ((0.3, 20), (0.5, 14), (0.7, 8)):
        spec = PseudoLabelSpec(targets="onehot", threshold=0.5, mask_threshold=threshold)
        targets, _ = pseudo_label_targets([det], [(28, 28)], spec)
        mask = targets[0]["masks"][0]
        assert int(mask.sum()) == 28 * columns, threshold
        assert bool(mask[:, 28 - columns:].all()) and not bool(mask[:, :28 - columns].any())
