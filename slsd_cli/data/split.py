"""Deterministic image-level splits: train / held-out (the paper's 85/15 protocol), optionally
stratified so that the held-out split sees every class it can (`stratify_holdout`), and nested
label-fraction subsets of the training images."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Collection, Iterable, Mapping

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


def stratify_holdout(order: list[int], n_holdout: int,
                     classes_of: Mapping[int, Collection[int]]) -> tuple[set[int], dict]:
    """The held-out images of a stratified split: the head of the permutation `order` (n_holdout
    images), moved the fewest images needed so that every class with >= 2 images keeps one in the
    held-out split (its Δ can then be measured: an absent class's Δ is only minus its mean score)
    and every class keeps one in the training split.

    Classes are served rarest first (then by id); each takes the first of its images in permutation
    order whose move breaks no class already served (a class's last training image, or the last
    held-out image of a class with >= 2 images, never moves). The held-out split is then brought
    back to n_holdout images with moves that break nothing (the latest images in the permutation
    leave it first, the earliest training images join it first). A conflict that cannot be solved
    (an image holding the only training image of one class and a needed image of another) keeps
    the training image and is reported. -> (held-out ids, {"moved", "classes_needing",
    "uncovered", "untrained"}: classes left without a held-out image / a training image)."""
    held = set(order[:n_holdout])
    plain = set(held)
    images_of: dict[int, list[int]] = {}
    for image in order:
        for c in classes_of.get(image, ()):
            images_of.setdefault(c, []).append(image)
    in_held = Counter(c for image in held for c in classes_of.get(image, ()))
    in_train = Counter(c for image in order if image not in held for c in classes_of.get(image, ()))
    needs_held = {c for c, images in images_of.items() if len(images) >= 2}

    def can_move(image: int, to_held: bool) -> bool:
        losing = in_train if to_held else in_held
        return all(losing[c] > 1 or (not to_held and c not in needs_held) for c in classes_of.get(image, ()))

    def move(image: int, to_held: bool) -> None:
        (held.add if to_held else held.discard)(image)
        for c in classes_of.get(image, ()):
            (in_held if to_held else in_train)[c] += 1
            (in_train if to_held else in_held)[c] -= 1

    for c in sorted(images_of, key=lambda c: (len(images_of[c]), c)):
        if in_train[c] == 0:
            image = next((i for i in reversed(images_of[c]) if can_move(i, False)), None)
            if image is not None:
                move(image, False)
        if c in needs_held and in_held[c] == 0:
            image = next((i for i in images_of[c] if can_move(i, True)), None)
            if image is not None:
                move(image, True)
    candidates = reversed(order) if len(held) > n_holdout else iter(order)
    for image in candidates:
        if len(held) == n_holdout:
            break
        to_held = len(held) < n_holdout
        if (image in held) != to_held and can_move(image, to_held):
            move(image, to_held)
    return held, {"moved": len(held ^ plain), "classes_needing": len(needs_held),
                  "uncovered": sorted(c for c in needs_held if in_held[c] == 0),
                  "untrained": sorted(c for c in images_of if in_train[c] == 0)}


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
                  fractions: Iterable[float] = (), seed: int = 0, force: bool = False,
                  stratify: bool = False) -> dict:
    """Split an LVIS/COCO json by image into `train.json` and `holdout.json` (a `holdout` share of
    the images, at least one when 0 < holdout), plus `train_frac{F}.json` for each fraction F of the
    training images. One permutation seeded by `seed` orders the images: the held-out set is its
    head, the training set the rest, and fraction F takes the first round(F * n_train) training images
    (at least one), so smaller fractions nest inside larger ones. With `stratify` the held-out set
    is that head moved as little as needed to hold an image of every class with >= 2 images while
    leaving every class a training image (`stratify_holdout`); its size stays the same.

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
    if stratify and holdout == 0:
        raise InputError("needs a held-out split (--holdout > 0)", record="--stratify")
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
    strata = None
    if stratify:
        classes_of = {i: {a["category_id"] for a in anns} for i, anns in annotations.anns_by_image.items()}
        held_set, strata = stratify_holdout(order, n_holdout, classes_of)
        holdout_ids, train_order = [i for i in order if i in held_set], [i for i in order if i not in held_set]
    else:
        holdout_ids, train_order = order[:n_holdout], order[n_holdout:]
    if not train_order:
        raise InputError("no training images left", path=source)

    base_info = _copied_info(data, source)

    def info(subset: str, fraction: float | None = None) -> dict:
        split = {"source": source.name, "subset": subset, "seed": seed, "holdout": holdout, "fraction": fraction}
        return {**base_info, "slsd_split": {**split, "stratify": True} if stratify else split}

    train = _subset(data, set(train_order), info("train"))
    held = _subset(data, set(holdout_ids), info("holdout"))
    train_frequency = {c["id"]: c["frequency"] for c in train["categories"]}
    held["categories"] = [{**c, "frequency": train_frequency[c["id"]]} for c in held["categories"]]
    outputs: list[tuple[str, dict, float | None]] = [("train.json", train, None), ("holdout.json", held, None)]
    for f in fractions:
        keep = set(train_order[:max(1, round(f * len(train_order)))])
        outputs.append((fraction_file_name(f), _subset(data, keep, info("train", f)), f))

    summary = {"source": str(source), "seed": seed, "holdout": holdout, "stratify": strata, "outputs": []}
    with FileSet(list(paths.values()), force) as files:  # all the split files appear together or none
        for name, dataset, fraction in outputs:
            atomic_write_json(files.stage(paths[name]), dataset)
            summary["outputs"].append(_describe(name, paths[name], dataset, fraction))
    return summary
