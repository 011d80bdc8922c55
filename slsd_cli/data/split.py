"""Deterministic image-level splits: train / held-out (the paper's 85/15 protocol) and nested
label-fraction subsets of the training images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from slsd_cli.data.lvis import load_annotations, recount_categories
from slsd_cli.errors import InputError
from slsd_cli.io import FileSet, atomic_write_json, check_output


def _copied_info(data: dict, source: Path) -> dict:
    """The source's `info`, copied into every output: an object that json can write (no NaN)."""
    info = data.get("info") or {}
    if not isinstance(info, dict):
        raise InputError(f"info must be an object, got {type(info).__name__}", path=source, record="info")
    try:
        json.dumps(info, allow_nan=False)
    except ValueError:
        raise InputError("holds a non-finite number (NaN or Infinity), which no json output can carry",
                         path=source, record="info") from None
    return dict(info)


def fraction_file_name(fraction: float) -> str:
    """`train_frac0.01.json` for 0.01 (positional notation, no exponent, no trailing zeros)."""
    return f"train_frac{np.format_float_positional(float(fraction), trim='-')}.json"


def _subset(data: dict, image_ids: set[int], info: dict) -> dict:
    """The dataset restricted to `image_ids` (file order kept; image records, with their LVIS fields,
    kept whole; every category kept), with counts and frequency groups recomputed."""
    out = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories", "info")}
    out["info"] = info
    out["images"] = [img for img in data["images"] if img["id"] in image_ids]
    out["annotations"] = [ann for ann in data["annotations"] if ann["image_id"] in image_ids]
    out["categories"] = data["categories"]
    return recount_categories(out)


def _describe(name: str, path: Path, dataset: dict, fraction: float | None) -> dict:
    frequency = {"r": 0, "c": 0, "f": 0}
    for c in dataset["categories"]:
        frequency[c["frequency"]] += 1
    return {
        "file": name,
        "path": str(path),
        "fraction": fraction,
        "images": len(dataset["images"]),
        "annotations": len(dataset["annotations"]),
        "categories_present": sum(1 for c in dataset["categories"] if c["image_count"] > 0),
        "frequency": frequency,
    }


def split_dataset(annotations_path: str | Path, out_dir: str | Path, holdout: float = 0.15,
                  fractions: Iterable[float] = (), seed: int = 0, force: bool = False) -> dict:
    """Split an LVIS/COCO json by image into `train.json` and `holdout.json` (a `holdout` share of
    the images, at least one when 0 < holdout), plus `train_frac{F}.json` for each fraction F of the
    training images. One permutation seeded by `seed` orders the images: the held-out set is its
    head, the training set the rest, and fraction F takes the first round(F * n_train) training images
    (at least one), so smaller fractions nest inside larger ones.

    Every output keeps the whole category list with `image_count`, `instance_count` and `frequency`
    recomputed from its own annotations — except that `holdout.json` takes its frequency groups from
    `train.json`, because groups are defined by training images (as LVIS val carries the train
    groups) and APr/APc/APf on the held-out set must use them. Outputs are written atomically; an
    existing one needs `force`. Returns a summary dict.
    """
    source = Path(annotations_path)
    out_dir = Path(out_dir)
    if not 0 <= holdout < 1:
        raise InputError(f"must be in [0, 1), got {holdout}", record="--holdout")
    fractions = sorted({float(f) for f in fractions})
    for f in fractions:
        if not 0 < f <= 1:
            raise InputError(f"must be in (0, 1], got {f}", record="--fraction")

    names = ["train.json", "holdout.json"] + [fraction_file_name(f) for f in fractions]
    paths = {name: out_dir / name for name in names}
    for path in paths.values():
        if path.resolve() == source.resolve():
            raise InputError("an output would overwrite the input annotations; choose another --out-dir",
                             path=path)
        check_output(path, force)  # refuse early, before the input is read

    annotations = load_annotations(source)
    data = annotations.data
    ids = annotations.image_ids
    n = len(ids)
    n_holdout = round(holdout * n)
    if holdout > 0:
        if n < 2:
            raise InputError(f"{n} image(s): a held-out split needs at least 2", path=source)
        n_holdout = min(max(n_holdout, 1), n - 1)
    order = [ids[k] for k in np.random.default_rng(seed).permutation(n)]
    holdout_ids, train_order = order[:n_holdout], order[n_holdout:]
    if not train_order:
        raise InputError("no training images left", path=source)

    base_info = _copied_info(data, source)

    def info(subset: str, fraction: float | None = None) -> dict:
        return {**base_info, "slsd_split": {"source": source.name, "subset": subset, "seed": seed,
                                            "holdout": holdout, "fraction": fraction}}

    train = _subset(data, set(train_order), info("train"))
    held = _subset(data, set(holdout_ids), info("holdout"))
    train_frequency = {c["id"]: c["frequency"] for c in train["categories"]}
    held["categories"] = [{**c, "frequency": train_frequency[c["id"]]} for c in held["categories"]]
    outputs: list[tuple[str, dict, float | None]] = [("train.json", train, None), ("holdout.json", held, None)]
    for f in fractions:
        keep = set(train_order[:max(1, round(f * len(train_order)))])
        outputs.append((fraction_file_name(f), _subset(data, keep, info("train", f)), f))

    summary = {"source": str(source), "seed": seed, "holdout": holdout, "outputs": []}
    with FileSet(list(paths.values()), force) as files:  # all the split files appear together or none
        for name, dataset, fraction in outputs:
            atomic_write_json(files.stage(paths[name]), dataset)
            summary["outputs"].append(_describe(name, paths[name], dataset, fraction))
    return summary
