"""Distillation building blocks: the EMA teacher update, and the student's loss on an unlabeled
image without pseudo-labels (background only, finite)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slsd_cli.engine.distill import join_batches, validate
from slsd_cli.engine.ema import EMATeacher, ema_update
from slsd_cli.errors import InputError


def _net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    net.register_buffer("constant", torch.tensor([0.1, 123.675, 58.395]), persistent=False)  # like pixel_mean
    return net


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        model.constant.mul_(1.5)  # even when the student's copy changes
    model.train()
    model(torch.randn(4, 3, 8, 8, generator=g))  # moves BatchNorm's running stats and counter


def test_ema_update_equals_the_formula():
    torch.manual_seed(0)
    student = _net()
    ema = EMATeacher(student, decay=0.9)
    assert not any(p.requires_grad for p in ema.teacher.parameters())
    assert not ema.teacher.training
    for step in range(3):
        _perturb(student, step)
        before = {k: v.clone() for k, v in ema.teacher.state_dict().items()}
        ema.update(student)
        after, s = ema.teacher.state_dict(), student.state_dict()
        for name, t in after.items():
            if t.is_floating_point():
                expected = 0.9 * before[name].double() + 0.1 * s[name].double()
                torch.testing.assert_close(t.double(), expected, rtol=1e-6, atol=1e-6)
                assert not torch.equal(t, before[name])  # it moved ...
                assert not torch.equal(t, s[name])       # ... but not all the way
            else:  # BatchNorm's num_batches_tracked: copied
                assert torch.equal(t, s[name])
    assert ema.updates == 3
    # a non-persistent buffer (a constant, rebuilt on resume) is not averaged: it stays bit-identical
    assert torch.equal(ema.teacher.constant, torch.tensor([0.1, 123.675, 58.395]))


def test_ema_extremes_and_state_round_trip():
    torch.manual_seed(1)
    student = _net()
    teacher = _net()
    _perturb(student, 5)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 1.0)  # decay 1: the teacher does not move
    for k, v in teacher.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, frozen[k])
    ema_update(teacher, student, 0.0)  # decay 0: the teacher is the student
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, student.state_dict()[k])
    with pytest.raises(ValueError):
        ema_update(teacher, student, 1.5)

    ema = EMATeacher(student, 0.99)
    _perturb(student, 6)
    ema.update(student)
    other = EMATeacher(_net(), 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    for k, v in other.teacher.state_dict().items():
        assert torch.equal(v, ema.teacher.state_dict()[k])


def test_join_batches_pads_to_the_larger_size():
    a = torch.ones(1, 3, 32, 64)
    b = torch.full((2, 3, 64, 32), 2.0)
    images, sizes, targets = join_batches((a, [(30, 60)], [{"x": 1}]), (b, [(64, 32), (50, 20)], [{"y": 2}, {"z": 3}]))
    assert images.shape == (3, 3, 64, 64)
    assert images[0, :, :32, :64].eq(1).all() and images[0, :, 32:].eq(0).all()
    assert images[1:, :, :, :32].eq(2).all() and images[1:, :, :, 32:].eq(0).all()
    assert sizes == [(30, 60), (64, 32), (50, 20)] and len(targets) == 3


def test_recipe_checks():
    from slsd_cli import recipe as recipes

    base = ["distill.teacher=t", "distill.unlabeled=u.json"]
    validate(recipes.load("synthetic_tiny_distill", base + ["distill.lam=0"]))
    with pytest.raises(InputError, match="calibration"):
        validate(recipes.load("synthetic_tiny_distill", base))  # soft, λ = 2, no calibration.json
    with pytest.raises(InputError, match="teacher"):
        validate(recipes.load("synthetic_tiny_distill", ["distill.unlabeled=u.json", "distill.lam=0"]))
    with pytest.raises(InputError, match="unlabeled_per_process"):
        validate(recipes.load("synthetic_tiny_distill", base + ["distill.lam=0", "train.micro_batch=1", "distill.unlabeled_per_process=3"]))
    validate(recipes.load("synthetic_tiny_distill", base + ["distill.targets=onehot"]))  # onehot needs no Δ


def test_start_line_names_the_pseudo_label_rule():
    """The run's start-up line shows what decides the pseudo-labels: threshold and the score it is
    applied to, the ignore band, the background rule."""
    from types import SimpleNamespace

    import torch

    from slsd_cli import recipe as recipes
    from slsd_cli.distributed import DistInfo
    from slsd_cli.engine.distill import describe

    recipe = recipes.load("synthetic_tiny_distill", ["distill.threshold=0.6", "distill.threshold_on=corrected",
                                                     "distill.ignore_low=0.2", "distill.background=teacher"])
    phase = SimpleNamespace(recipe=recipe, categories=[{"id": 1}] * 3, spec=SimpleNamespace(corrects=True),
                            labeled=SimpleNamespace(dataset=[0] * 5), unlabeled=SimpleNamespace(dataset=[0] * 7))
    line = describe(phase, DistInfo(0, 1, 0, torch.device("cpu")))
    assert "3 classes, 5 labeled + 7 unlabeled images" in line
    assert "threshold 0.6 on the corrected score, ignore band [0.2, 0.6], background teacher" in line
    default = recipes.load("synthetic_tiny_distill")
    line = describe(SimpleNamespace(**{**vars(phase), "recipe": default}), DistInfo(0, 1, 0, torch.device("cpu")))
    assert f"threshold {default.distill.threshold} on the raw score, ignore band off, background hard" in line


def test_unlabeled_image_without_pseudo_labels_gives_finite_background_loss(one_thread):
    from slsd_cli.model.model_config import tiny_cnn_config
    from slsd_cli.model.detector import build_model

    torch.manual_seed(0)
    model = build_model(tiny_cnn_config(image_size=64, rois_per_image=16), num_classes=3)
    model.train()
    images = torch.rand(2, 3, 64, 64) * 255
    labeled = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([1]),
               "masks": torch.zeros(1, 64, 64, dtype=torch.uint8), "class_targets": torch.tensor([[0.1, 0.8, 0.1]])}
    labeled["masks"][0, 8:36, 8:40] = 1
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8), "class_targets": torch.zeros(0, 3),
             "loss_weight": 1.0}
    for targets in ([labeled, empty], [dict(empty), dict(empty)]):
        model.zero_grad()
        losses = model(images, [(64, 64), (64, 64)], targets)
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        total.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    # with only background images the classification loss still teaches "background" (non-zero)
    assert float(losses["cls_stage0"].detach()) > 0 and float(losses["rpn_cls"].detach()) > 0


def test_unlabeled_images_come_from_the_folder_retrieve_recorded(tmp_path):
    """No distill.unlabeled_images: the folder `slsd retrieve` records (info.images_dir) wins over
    images/ beside the json; a relative one is tried from the json's folder; neither is an error."""
    import json
    from types import SimpleNamespace

    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.engine.distill import unlabeled_images_dir

    (tmp_path / "images").mkdir()              # beside the json: must not be taken
    (tmp_path / "pool" / "imgs").mkdir(parents=True)
    doc = {"images": [{"id": 1, "width": 8, "height": 8, "file_name": "a.png"}], "categories": [{"id": 1, "name": "a"}],
           "info": {"images_dir": str(tmp_path / "pool" / "imgs")}}
    path = tmp_path / "unlabeled.json"
    path.write_text(json.dumps(doc))
    recipe = SimpleNamespace(distill=SimpleNamespace(unlabeled_images=None, unlabeled=str(path)))
    assert unlabeled_images_dir(recipe, load_annotations(path, require_annotations=False)) == tmp_path / "pool" / "imgs"
    doc["info"]["images_dir"] = "pool/imgs"    # relative, not found from the working directory
    path.write_text(json.dumps(doc))
    assert unlabeled_images_dir(recipe, load_annotations(path, require_annotations=False)) == tmp_path / "pool" / "imgs"
    doc["info"]["images_dir"] = "nowhere"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="unlabeled image folder not found"):
        unlabeled_images_dir(recipe, load_annotations(path, require_annotations=False))


def test_calibration_file_errors_name_the_record(tmp_path):
    """distill reads Δ through `load_delta`: a bad entry is a one-line error naming per_class.<key>."""
    import json

    from slsd_cli.labels.calibration import load_delta

    path = tmp_path / "calibration.json"
    for per_class, words in (({"x7": {"delta": 0.1}}, "not an integer"), ({"9": {"delta": 0.1}}, "not one of"),
                             ({"3": {"delta": 1.5}}, "delta must be")):
        path.write_text(json.dumps({"per_class": per_class}))
        with pytest.raises(InputError, match=words) as info:
            load_delta(path, [3, 5])
        assert info.value.record == f"per_class.{next(iter(per_class))}" and info.value.path == str(path)
    path.write_text(json.dumps({"per_class": {"5": {"delta": -0.25}}}))
    assert load_delta(path, [3, 5]).tolist() == [0.0, -0.25]


def test_pseudo_label_spec_accepts_exactly_its_documented_choices():
    from slsd_cli.labels.pseudo_labels import PseudoLabelSpec

    for background in ("hard", "teacher"):
        assert PseudoLabelSpec(background=background).background == background
    for threshold_on in ("raw", "corrected"):
        assert PseudoLabelSpec(threshold_on=threshold_on).threshold_on == threshold_on
    for bad in ({"background": "soft"}, {"threshold_on": "both"}, {"targets": "hard"}, {"scope": "top"},
                {"threshold": 1.5}, {"mask_threshold": 1.0}, {"ignore_low": 0.7, "threshold": 0.5}):
        with pytest.raises(ValueError):
            PseudoLabelSpec(**bad)
