"""Saving, loading and building detectors.

A saved detector is a directory with
- `model.safetensors`: the state dict; its metadata repeats the class count and category ids;
- `model.json`: {"format", "model" (the ModelConfig: every key, the input normalisation
  `pixel_mean` / `pixel_std` included — it is no tensor of the state dict), "num_classes",
  "categories" [{id, name, frequency, image_count, ...}] in contiguous class order, "extra"
  (anything the caller adds)}; the safetensors metadata repeats `pixel_mean` / `pixel_std`.
Both are written atomically. `load_detector` rebuilds the model from the json (random init, no
backbone weight download), then loads the tensors strictly: a missing, unexpected or differently
shaped tensor, categories or a normalisation that disagree (between the two files, or categories
with the caller's list), is an InputError naming the file. The shapes are checked against a
meta-device skeleton before the model is built, so a dimension in model.json that the weights do
not have (a corrupt or hostile width) allocates nothing. `check_same_network` refuses a config
that differs from a saved detector's in any key but the weight source, training and post-processing
ones (`model_config.NON_NETWORK_KEYS`): a distillation student is the teacher's network.
`build_detector` with `cfg.init_from = RUN` starts from a saved detector's tensors (the same strict
checks; its category ids must equal the given ones, in order).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from slsd_cli.typed_yaml import from_dict, to_dict
from slsd_cli.errors import InputError
from slsd_cli.io import (atomic_write_json, json_metadata, load_safetensors, make_dirs, read_json,
                         save_safetensors_atomic)
from slsd_cli.model.model_config import NON_NETWORK_KEYS, WEIGHT_SOURCE_KEYS, ModelConfig
from slsd_cli.model.detector import CascadeMaskRCNN, build_model

FORMAT = "slsd-detector/1"
WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
CATEGORY_KEYS = ("id", "name", "frequency", "image_count", "instance_count")
PIXEL_KEYS = ("pixel_mean", "pixel_std")  # the input normalisation: in model.json and the weights' metadata


def _category_records(categories: list[dict]) -> list[dict]:
    out = []
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c:
            raise InputError("each category needs an 'id'", record=f"categories[{i}]")
        out.append({k: c[k] for k in CATEGORY_KEYS if k in c})
    ids = [c["id"] for c in out]
    if len(set(ids)) != len(ids):
        raise InputError("duplicate category ids", record="categories")
    return out


def build_detector(cfg: ModelConfig, categories: list[dict]) -> CascadeMaskRCNN:
    """A detector for these categories (contiguous order = list order); federated-loss weights
    from their `image_count` (uniform when a category lacks it)."""
    categories = _category_records(categories)
    counts = None
    if all("image_count" in c for c in categories):
        counts = [int(c["image_count"]) for c in categories]
    elif cfg.classifier == "sigmoid" and cfg.use_federated:
        from slsd_cli.progress import warn

        warn("categories lack image_count: the federated loss samples classes uniformly")
    if cfg.init_from:  # every tensor comes from the run: no backbone download or weights file
        model = build_model(dataclasses.replace(cfg, pretrained=False, weights=None), len(categories), counts)
        model.cfg = cfg
        init_from_run(model, cfg.init_from, categories)
        return model
    return build_model(cfg, len(categories), counts)


def init_from_run(model: CascadeMaskRCNN, run: str | Path, categories: list[dict]) -> None:
    """Copy a saved detector's tensors into `model` (strict), after checking its categories."""
    tensors, meta, weights_path, meta_path = read_saved(run)
    _check_categories(meta, categories, meta_path, "model.init_from")
    load_strict(model, tensors, weights_path, meta_path.name)


def save_detector(model: CascadeMaskRCNN, out_dir: str | Path, categories: list[dict], model_cfg: ModelConfig,
                  extra: dict | None = None) -> None:
    out_dir = Path(out_dir)
    model = model.module if hasattr(model, "module") else model  # unwrap DDP
    categories = _category_records(categories)
    if len(categories) != model.num_classes:
        raise InputError(f"{len(categories)} categories for a model with {model.num_classes} classes",
                         path=out_dir)
    given = {k: v for k, v in to_dict(model_cfg).items() if k not in WEIGHT_SOURCE_KEYS}
    built = {k: v for k, v in to_dict(model.cfg).items() if k not in WEIGHT_SOURCE_KEYS}
    if given != built:
        diff = sorted(k for k in given if given[k] != built.get(k))
        raise InputError(f"model_cfg differs from the config the model was built with ({', '.join(diff)})",
                         path=out_dir)
    state = dict(model.state_dict())
    metadata = {"format": FORMAT, "num_classes": str(model.num_classes),
                "category_ids": json.dumps([c["id"] for c in categories]),
                **{key: json.dumps(getattr(model_cfg, key)) for key in PIXEL_KEYS}}
    make_dirs(out_dir)
    save_safetensors_atomic(state, out_dir / WEIGHTS_NAME, metadata=metadata)
    meta = {"format": FORMAT, "model": to_dict(model_cfg), "num_classes": model.num_classes,
            "categories": categories, "extra": extra or {}}
    atomic_write_json(out_dir / META_NAME, meta, indent=1)


def model_files(path: str | Path) -> tuple[Path, Path]:
    """(model.safetensors, model.json) of a saved detector given as its folder or either file. A run
    given by the user is first resolved to that folder by `run_dir.resolve_model` (which of its models)."""
    path = Path(path)
    if path.is_dir():
        return path / WEIGHTS_NAME, path / META_NAME
    if path.suffix == ".json":
        return path.with_name(WEIGHTS_NAME), path
    return path, path.with_name(META_NAME)


def read_saved(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path, Path]:
    """A saved detector's (tensors, model.json, weights path, json path), with the two files' category
    ids checked against each other."""
    weights_path, meta_path = model_files(path)
    if not weights_path.is_file():
        raise InputError("no model.safetensors here (expected a run dir or a model.safetensors file)",
                         path=weights_path)
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"not an slsd detector description (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {FORMAT!r})", path=meta_path)
    for key in ("model", "categories", "num_classes"):
        if key not in meta:
            raise InputError(f"missing {key!r}", path=meta_path)
    _check_meta_types(meta, meta_path)
    if len(meta["categories"]) != meta["num_classes"]:
        raise InputError(f"{len(meta['categories'])} categories but num_classes = {meta['num_classes']}",
                         path=meta_path)
    tensors, metadata = load_safetensors(weights_path)
    ids = [c["id"] for c in meta["categories"]]
    if metadata.get("category_ids") is not None and json_metadata(metadata, "category_ids", weights_path) != ids:
        raise InputError(f"category ids in the weights disagree with {meta_path.name}", path=weights_path)
    for key in PIXEL_KEYS:  # files written before the weights recorded it have no such entry
        if metadata.get(key) is not None and json_metadata(metadata, key, weights_path) != meta["model"].get(key):
            raise InputError(f"model.{key} in {meta_path.name} ({meta['model'].get(key)}) disagrees with the "
                             f"normalisation the weights were saved with ({metadata[key]})", path=meta_path)
    return tensors, meta, weights_path, meta_path


def check_same_network(cfg: ModelConfig, meta: dict, meta_path: Path, role: str = "teacher") -> None:
    """Refuse `cfg` when any key other than the weight source and `NON_NETWORK_KEYS` differs
    from the saved detector's model config (`meta` = its model.json): one line naming the first key."""
    saved = to_dict(from_dict(ModelConfig, meta["model"], source=meta_path, prefix="model."))
    own = to_dict(cfg)
    for key, value in own.items():
        if key in WEIGHT_SOURCE_KEYS or key in NON_NETWORK_KEYS or saved.get(key) == value:
            continue
        raise InputError(f"model.{key} is {value!r} but the {role} was built with {saved.get(key)!r}: the student "
                         f"is the {role}'s network (remove the key or give the {role}'s value)", path=meta_path)


def _check_meta_types(meta: dict, meta_path: Path) -> None:
    """model.json's numbers and ids have the right types (a corrupt file stops here, in one line)."""
    from slsd_cli.data.lvis import check_number

    check_number(meta["num_classes"], "num_classes", path=meta_path, integer=True, minimum=1)
    if not isinstance(meta["model"], dict):
        raise InputError("'model' must be an object (the model: section of the recipe)", path=meta_path)
    if not isinstance(meta["categories"], list):
        raise InputError("'categories' must be a list of category objects", path=meta_path)
    for i, category in enumerate(meta["categories"]):
        if not isinstance(category, dict):
            raise InputError("must be an object", path=meta_path, record=f"categories[{i}]")
        check_number(category.get("id"), "id", path=meta_path, record=f"categories[{i}]", integer=True)
        for key in ("image_count", "instance_count"):
            if key in category:
                check_number(category[key], key, path=meta_path, record=f"categories[{i}]", integer=True, minimum=0)


def _check_categories(meta: dict, categories: list[dict], meta_path: Path, record: str | None = None) -> None:
    ids = [c["id"] for c in meta["categories"]]
    want = [c["id"] for c in categories]
    if want != ids:
        diff = next((i for i, (a, b) in enumerate(zip(want, ids)) if a != b), min(len(want), len(ids)))
        raise InputError(f"the checkpoint's {len(ids)} categories differ from the {len(want)} expected "
                         f"(first difference at class index {diff})", path=meta_path, record=record)


def load_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path,
                described_by: str = META_NAME) -> None:
    """Load `tensors` into `model`: every tensor present, none extra, equal shapes (else an
    InputError naming the first offending key)."""
    check_fits(model.state_dict(), tensors, source, described_by)
    model.load_state_dict(tensors)


def check_fits_before_building(cfg: ModelConfig, categories: list[dict], tensors: dict[str, torch.Tensor],
                               source: str | Path, described_by: str = META_NAME) -> None:
    """`check_fits` against a skeleton of the described detector on the meta device, which
    allocates nothing: a model.json whose dimensions disagree with its weights (a width that would
    take terabytes) stops here, naming the first tensor, before the model is built."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        skeleton = build_detector(cfg, categories)
    check_fits(skeleton.state_dict(), tensors, source, described_by)


def check_fits(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str | Path,
               described_by: str = META_NAME) -> None:
    """`tensors` have exactly the names and shapes of the state dict `own` (else an InputError
    naming the first offending key)."""
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise InputError(f"weights do not fit the model described in {described_by}: " + ", ".join(parts),
                         path=source)
    for key, value in own.items():
        if tensors[key].shape != value.shape:
            raise InputError(f"tensor {key} has shape {tuple(tensors[key].shape)}, the model described in "
                             f"{described_by} expects {tuple(value.shape)}", path=source)


def load_detector(path: str | Path, device: str | torch.device = "cpu",
                  categories: list[dict] | None = None) -> tuple[CascadeMaskRCNN, dict[str, Any]]:
    """Load a saved detector (run dir, model.safetensors or model.json). With `categories`, refuse
    a checkpoint whose category ids (in order) differ. -> (model in eval mode on device, meta)."""
    tensors, meta, weights_path, meta_path = read_saved(path)
    cfg = from_dict(ModelConfig, meta["model"], source=meta_path, prefix="model.")
    # the tensors come from the checkpoint: no backbone download, weights file or init run
    cfg = dataclasses.replace(cfg, pretrained=False, weights=None, init_from=None)
    if categories is not None:
        _check_categories(meta, categories, meta_path)
    check_fits_before_building(cfg, meta["categories"], tensors, weights_path, meta_path.name)
    model = build_detector(cfg, meta["categories"])
    load_strict(model, tensors, weights_path, meta_path.name)
    model.to(device).eval()
    return model, meta
