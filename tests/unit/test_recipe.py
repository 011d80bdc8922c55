"""Recipes (issue 12 class 4, issue 15.5): every numeric key has a range checked before any work, files
that are empty / binary / malformed are refused with one line, `1e-4` is a number, flags set typed
fields, and misspelt keys get the nearest valid ones."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from slsd_cli import recipe as recipes
from slsd_cli.errors import InputError
from slsd_cli.typed_yaml import Interval, all_keys, apply_flags, apply_overrides, nearest_keys, ranged

BAD_OVERRIDES = [
    ("train.lr=-1", "train.lr must lie in (0, inf)"),
    ("train.lr=0", "train.lr must lie in (0, inf)"),
    ("train.lr=.inf", "train.lr must be a finite number"),
    ("train.lr=.nan", "train.lr must be a finite number"),
    ("train.lr=1e999", "train.lr must be a finite number"),
    ("train.iterations=0", "train.iterations must lie in [1, inf)"),
    ("train.micro_batch=3", "micro_batch (3) must divide batch_per_process"),
    ("train.betas=[0.9, 1.0]", "train.betas[1] must lie in [0, 1)"),
    ("train.seed=4294967296", "train.seed must lie in [0, 4294967295]"),
    ("train.warmup_factor=0", "train.warmup_factor must lie in (0, 1]"),
    ("data.scale_range=[2.0, 1.0]", "data.scale_range must be [low, high] with low <= high"),
    ("data.scale_range=[0, 1]", "data.scale_range[0] must lie in (0, 100]"),
    ("data.image_size=0", "data.image_size must lie in [32, 16384]"),
    ("data.num_workers=-1", "data.num_workers must lie in [0, inf)"),
    ("smoothing.epsilon=1.5", "smoothing.epsilon must lie in [0, 1]"),
    ("smoothing.gamma=-0.5", "smoothing.gamma must lie in [0, inf)"),
    ("distill.threshold=-0.1", "distill.threshold must lie in [0, 1]"),
    ("distill.ema=2", "distill.ema must lie in [0, 1]"),
    ("distill.lam=-1", "distill.lam must lie in [0, inf)"),
    ("distill.unlabeled_per_process=0", "distill.unlabeled_per_process must lie in [1, inf)"),
    ("model.fpn_channels=0", "model.fpn_channels must lie in [1, inf)"),
    ("model.anchor_sizes=[0, 32, 64, 128, 256]", "model.anchor_sizes[0] must lie in [1, inf)"),
    ("model.rpn_iou_thresholds=[0.7, 0.3]", "rpn_iou_thresholds must be [low, high]"),
    ("model.test_nms=0", "model.test_nms must lie in (0, 1]"),
    ("model.pixel_std=[1.0, 0.0, 1.0]", "model.pixel_std[1] must lie in (0, inf)"),
    ("train.schedule=linear", "train.schedule must be one of cosine, constant"),
    ("train.iterations=1.5", "train.iterations must be an integer"),
]


@pytest.mark.parametrize("override,needle", BAD_OVERRIDES, ids=[o.split("=")[0] for o, _ in BAD_OVERRIDES])
def test_out_of_range_overrides_are_refused(override, needle):
    with pytest.raises(InputError) as info:
        recipes.load("synthetic_tiny", [override])
    message = info.value.format()
    assert needle in message and "\n" not in message


def test_the_same_ranges_hold_in_a_recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: -0.001\n")
    with pytest.raises(InputError, match="train.lr must lie in") as info:
        recipes.load(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("text", ["train:\n  lr: 1e-4\n", "train:\n  lr: 1.0e-4\n", "train:\n  lr: 0.0001\n"])
def test_exponent_without_a_dot_is_a_number(tmp_path, text):
    """yaml 1.1 reads `1e-4` as a string; a float field takes it as the number the README shows."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    lr = recipes.load(path).train.lr
    assert lr == 1e-4 and isinstance(lr, float)
    lr = recipes.load("synthetic_tiny", ["train.lr=1e-4"]).train.lr
    assert lr == 1e-4 and isinstance(lr, float)
    with pytest.raises(InputError, match="train.lr must be a number"):
        recipes.load("synthetic_tiny", ["train.lr=fast"])


@pytest.mark.parametrize("content,needle", [
    (b"", "empty recipe"),
    (b"# only a comment\n", "empty recipe"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"train: {lr: \xff}\n", "not utf-8"),
    (b"train:\n  lr: [1, 2\nmodel: {}\n", "line 3, column 6"),
    (b"- a\n- b\n", "must be a mapping"),
], ids=["empty", "comment-only", "binary", "latin1", "yaml-error", "list"])
def test_unusable_recipe_files_are_refused_in_one_line(tmp_path, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        recipes.load(path)
    message = info.value.format()
    assert needle in message and message.startswith(str(path)) and "\n" not in message


def test_override_syntax_and_unknown_keys_name_what_is_wrong():
    with pytest.raises(InputError, match="has no key before '='"):
        recipes.load("synthetic_tiny", ["=3"])
    with pytest.raises(InputError, match="must look like section.key=value"):
        recipes.load("synthetic_tiny", ["train.lr"])
    with pytest.raises(InputError, match=r"cannot parse value '\[1': line 1, column 3"):
        recipes.load("synthetic_tiny", ["train.betas=[1"])
    with pytest.raises(InputError) as info:
        recipes.load("synthetic_tiny", ["train.lrr=1"])
    message = info.value.format()
    assert "unknown key train.lrr; did you mean train.lr" in message
    assert message.count("train.") <= 4, "the nearest keys, not all of them"
    with pytest.raises(InputError, match="did you mean train.lr"):
        recipes.load("synthetic_tiny", ["lr=1"])  # the section left out
    with pytest.raises(InputError, match="sections: data, distill"):
        recipes.load("synthetic_tiny", ["zzz.qqq=1"])


def test_nearest_keys_suggests_few():
    valid = all_keys(recipes.Recipe)
    assert len(valid) > 80
    hint = nearest_keys("smoothing.epsilom", valid)
    assert hint.startswith("; did you mean smoothing.epsilon")


def test_flags_set_typed_fields_without_reparsing():
    base = recipes.load("synthetic_tiny")
    changed = apply_flags(base, {"smoothing.epsilon": 0.2, "smoothing.prototypes": Path("null"),
                                 "data.train_json": Path("1e-4"), "train.iterations": None})
    assert changed.smoothing.epsilon == 0.2
    assert changed.smoothing.prototypes == "null" and changed.data.train_json == "1e-4", "paths stay text"
    assert changed.train.iterations == base.train.iterations, "None = flag not given"
    assert base.smoothing.epsilon == 0.1, "the input recipe is not modified"
    with pytest.raises(InputError, match="smoothing.epsilon must lie in"):
        apply_flags(base, {"smoothing.epsilon": 2.0})
    with pytest.raises(InputError, match="smoothing.mode must be one of none, uniform, similarity"):
        apply_flags(base, {"smoothing.mode": "fancy"})
    # a flag and an override of the same key give the same recipe
    assert apply_flags(base, {"train.lr": 1e-4}) == apply_overrides(base, ["train.lr=1e-4"])


def test_every_numeric_key_declares_a_range():
    """New keys follow the rule: an int or float field without `ranged(...)` fails here."""
    import typing

    from slsd_cli.typed_yaml import RANGE_KEY, _unwrap_optional

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, _ = _unwrap_optional(hints[f.name])
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, prefix + f.name + ".")
                continue
            leaf = tp
            while typing.get_origin(leaf) in (list, tuple):
                leaf = typing.get_args(leaf)[0]
            if leaf in (int, float):
                yield prefix + f.name, RANGE_KEY in f.metadata

    missing = [key for key, ok in walk(recipes.Recipe) if not ok]
    assert not missing, f"numeric recipe keys without a range: {missing}"


def test_packaged_recipes_satisfy_their_ranges_and_tiny_model_is_the_recipe():
    from slsd_cli.model.model_config import tiny_cnn_config

    for name in recipes.packaged_recipes():
        recipes.load(name)
    tiny = recipes.load("synthetic_tiny").model  # the tests' tiny model: the recipe on a random-init ResNet-18
    assert tiny_cnn_config(backbone=tiny.backbone, pretrained=tiny.pretrained, pixel_mean=tiny.pixel_mean,
                           pixel_std=tiny.pixel_std) == tiny
    assert tiny_cnn_config().backbone == "resnet18" and not tiny_cnn_config().pretrained
    assert tiny_cnn_config(image_size=64).image_size == 64


def test_interval_notation():
    unit = Interval.parse("[0, 1)")
    assert unit.contains(0) and unit.contains(0.5) and not unit.contains(1)
    assert Interval.parse("(0, inf)").contains(1e300) and not Interval.parse("(0, inf)").contains(0)
    with pytest.raises(ValueError):
        ranged(1, "0..1")


def test_distill_takes_the_teachers_smoothing_when_its_mode_is_null():
    """One distillation across recipes: with smoothing.mode null the labeled images keep the teacher
    run's targets (mode, ε, γ, τ, prototypes); an explicit mode keeps the recipe's own values."""
    from slsd_cli.engine.distill import inherit_from_teacher
    from slsd_cli.errors import InputError

    teacher = {"extra": {"recipe": {"data": {"train_json": "t.json"}, "smoothing": {
        "mode": "similarity", "epsilon": 0.2, "gamma": 0.0, "temperature": 0.05, "prototypes": "p.safetensors"}}}}
    recipe, taken = inherit_from_teacher(recipes.load("synthetic_tiny_distill"), teacher)
    s = recipe.smoothing
    assert (s.mode, s.epsilon, s.gamma, s.temperature, s.prototypes) == ("similarity", 0.2, 0.0, 0.05, "p.safetensors")
    assert "smoothing.temperature" in taken and recipe.data.train_json == "t.json"
    old = {"extra": {"recipe": {"smoothing": {"mode": "uniform", "epsilon": 0.1, "gamma": 1.5}}}}  # before τ
    assert inherit_from_teacher(recipes.load("synthetic_tiny_distill"), old)[0].smoothing.temperature == 1.0
    own = recipes.load("synthetic_tiny_distill", ["smoothing.mode=uniform", "smoothing.epsilon=0.3"])
    kept = inherit_from_teacher(own, teacher)[0].smoothing
    assert (kept.mode, kept.epsilon, kept.temperature) == ("uniform", 0.3, 1.0)
    with pytest.raises(InputError, match="does not record its smoothing"):
        inherit_from_teacher(recipes.load("synthetic_tiny_distill"), {"extra": {}})
