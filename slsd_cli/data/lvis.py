"""Reading, validating and writing LVIS v1 / COCO instance annotations.

Everything that reads a user's annotation file goes through `load_annotations`, which checks the
whole file before any work starts and rejects the first bad record with an `InputError` naming the
file and the record. Category ids stay as in the file; models use the contiguous index given by
`Annotations.category_index`.
"""

from __future__ import annotations

import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal

import numpy as np
from pycocotools import mask as mask_utils

from slsd_cli.errors import InputError
from slsd_cli.io import gc_paused, read_json

if TYPE_CHECKING:  # torch is imported where it is used: `slsd eval --detections` never loads it
    import torch

Protocol = Literal["lvis", "coco"]

# LVIS frequency groups by the number of training images a class appears in.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100
# Boxes may overshoot the image by rounding; more than this is an error.
BOX_TOLERANCE_PX = 1.0


# The groups' one home: their letters in LVIS's order (every table, log and option lists them so)
# and their names in tables and options (`slsd retrieve --queries rare`).
FREQUENCY_GROUPS = ("r", "c", "f")
GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def frequency_group(image_count: int) -> str:
    """'r' (<= 10 training images), 'c' (11-100) or 'f' (> 100), as LVIS defines them."""
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    if image_count <= COMMON_MAX_IMAGES:
        return "c"
    return "f"


@dataclass
class Annotations:
    """A validated instance-segmentation dataset (LVIS v1 or COCO layout)."""

    path: Path
    data: dict[str, Any]
    protocol: Protocol
    images: dict[int, dict] = field(init=False)
    categories: list[dict] = field(init=False)
    annotations: list[dict] = field(init=False)
    category_ids: list[int] = field(init=False)
    category_index: dict[int, int] = field(init=False)
    anns_by_image: dict[int, list[dict]] = field(init=False)

    def __post_init__(self) -> None:
        self.images = {img["id"]: img for img in self.data["images"]}
        self.categories = sorted(self.data["categories"], key=lambda c: c["id"])
        self.annotations = self.data.get("annotations", [])
        self.category_ids = [c["id"] for c in self.categories]
        self.category_index = {cid: i for i, cid in enumerate(self.category_ids)}
        by_image: dict[int, list[dict]] = defaultdict(list)
        for ann in self.annotations:
            by_image[ann["image_id"]].append(ann)
        self.anns_by_image = dict(by_image)

    @property
    def image_ids(self) -> list[int]:
        return sorted(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def image_file(self, image_id: int, images_dir: str | Path) -> Path:
        return Path(images_dir) / image_file_name(self.images[image_id])

    def frequencies(self) -> list[str]:
        """Frequency group per class (contiguous order): from the file when given, else computed."""
        return [c["frequency"] for c in self.categories]

    def image_counts(self) -> list[int]:
        return [int(c["image_count"]) for c in self.categories]

    def instance_counts(self) -> list[int]:
        return [int(c["instance_count"]) for c in self.categories]


def image_file_name(image: dict, path: str | Path | None = None, record: Any = None) -> str:
    """COCO gives `file_name`; LVIS v1 gives `coco_url`, whose last part is the file name. The name is
    checked (`check_file_name`): it resolves lexically under the image folder it is joined to."""
    name = image.get("file_name")
    if name is None and isinstance(image.get("coco_url"), str):
        name = image["coco_url"].rsplit("/", 1)[-1]
        if not name:
            raise InputError("coco_url ends with '/': it names no file", path=path, record=record)
    elif name is None:
        missing = "file_name is null" if "file_name" in image else "missing required key 'file_name'"
        raise InputError(f"{missing} (and no coco_url)", path=path, record=record)
    return check_file_name(name, path=path, record=record)


def check_file_name(name: Any, *, path: str | Path | None = None, record: Any = None) -> str:
    """An image's file name, relative to its image folder: a non-empty string without control
    characters, not absolute, and without `..` parts, so that `images_dir / name` stays inside the
    folder (lexically: symlinked folders inside it keep working)."""
    if not isinstance(name, str):
        raise InputError(f"file_name must be a string, got {_show(name)}", path=path, record=record)
    if not name.strip():
        raise InputError("file_name is empty", path=path, record=record)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise InputError(f"file_name {name!r} holds a control character (a newline, a tab, ...)", path=path,
                         record=record)
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise InputError(f"file_name {name!r} is an absolute path: image names are relative to the image "
                         "folder (--images)", path=path, record=record)
    if ".." in parts:
        raise InputError(f"file_name {name!r} leads out of the image folder ('..'): image names are relative "
                         "to the image folder (--images)", path=path, record=record)
    return name


def detect_protocol(data: dict) -> Protocol:
    lvis_image_keys = ("neg_category_ids", "not_exhaustive_category_ids")
    if any(k in img for img in data.get("images", [])[:50] for k in lvis_image_keys):
        return "lvis"
    if any("frequency" in c for c in data.get("categories", [])[:50]):
        return "lvis"
    return "coco"


def category_stats(annotations: Iterable[dict], category_ids: Iterable[int]) -> dict[int, dict]:
    """image_count, instance_count and frequency group of each category, from the annotations."""
    images_of: dict[int, set] = {cid: set() for cid in category_ids}
    instances = dict.fromkeys(images_of, 0)
    for ann in annotations:
        images_of[ann["category_id"]].add(ann["image_id"])
        instances[ann["category_id"]] += 1
    return {
        cid: {"image_count": len(imgs), "instance_count": instances[cid], "frequency": frequency_group(len(imgs))}
        for cid, imgs in images_of.items()
    }


def recount_categories(data: dict) -> dict:
    """Return `data` with every category's counts and frequency group recomputed from its annotations."""
    stats = category_stats(data.get("annotations", []), [c["id"] for c in data["categories"]])
    categories = [{**c, **stats[c["id"]]} for c in data["categories"]]
    return {**data, "categories": categories}


# ---------------------------------------------------------------- validation


INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


FLOAT_MAX = sys.float_info.max


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):  # a json integer can exceed any float (1e400): not a usable number
        return -FLOAT_MAX <= value <= FLOAT_MAX
    return math.isfinite(value)


def check_number(value: Any, name: str, *, path: str | Path | None = None, record: Any = None,
                 integer: bool = False, minimum: float | None = None, maximum: float | None = None,
                 above: float | None = None) -> int | float:
    """The one check of a numeric field read from a user's file (annotations, detections, metadata).

    Accepts a json number (never a bool, a string or a list) that is finite, an integer when
    `integer` (then also within int64, so numpy and torch can hold it), `>= minimum`, `<= maximum`
    and `> above` when given; returns it. Anything else is an InputError naming `path`, `record`
    and the field `name`, so a NaN area or an id beyond int64 stops at load instead of turning
    into a wrong metric or a crash deep inside."""
    if integer:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{name} must be an integer, got {_show(value)}", path=path, record=record)
        if not INT64_MIN <= value <= INT64_MAX:
            raise InputError(f"{name} {value} is beyond the 64-bit integer range", path=path, record=record)
    elif not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {_show(value)}", path=path, record=record)
    elif not _is_number(value):
        raise InputError(f"{name} must be a finite number, got {_show(value)}", path=path, record=record)
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum:g}, got {value}", path=path, record=record)
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be <= {maximum:g}, got {value}", path=path, record=record)
    if above is not None and value <= above:
        raise InputError(f"{name} must be > {above:g}, got {value}", path=path, record=record)
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _require_keys(record: dict, keys: tuple[str, ...], path: Path, where: str) -> None:
    if not isinstance(record, dict):
        raise InputError("must be an object", path=path, record=where)
    for key in keys:
        if key not in record:
            raise InputError(f"missing required key '{key}'", path=path, record=where)


def _types_within(values: Iterable[Any], allowed: set[type]) -> bool:
    """True when every value's exact type is in `allowed` (so a bool never passes for an int)."""
    return set(map(type, values)) <= allowed


def _all_int64(values: list[Any]) -> bool:
    """True when every value is a json integer within int64 (what `check_number(integer=True)` accepts)."""
    if not _types_within(values, {int}):
        return False
    try:
        np.fromiter(values, dtype=np.int64, count=len(values))
    except OverflowError:
        return False
    return True


def _all_finite(values: list[Any]) -> np.ndarray | None:
    """`values` as float64 when every one is a finite json number (what `_is_number` accepts), else None."""
    if not _types_within(values, {int, float}):
        return None
    try:
        array = np.fromiter(values, dtype=np.float64, count=len(values))
    except OverflowError:  # an int beyond float range
        return None
    return array if np.isfinite(array).all() else None


def _check_ids_unique(records: list[dict], path: Path, section: str) -> None:
    ids = [rec["id"] for rec in records]
    if _all_int64(ids) and len(set(ids)) == len(ids):  # the common case, decided without a Python loop
        return
    seen: set = set()
    for i, rec in enumerate(records):
        check_number(rec["id"], "id", path=path, record=f"{section}[{i}]", integer=True)
        if rec["id"] in seen:
            raise InputError(f"duplicate id {rec['id']}", path=path, record=f"{section}[{i}]")
        seen.add(rec["id"])


def _validate_segmentation(seg: Any, image: dict, path: Path, where: str) -> None:
    if isinstance(seg, list):
        if not seg:
            raise InputError("empty polygon list", path=path, record=where)
        for j, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                raise InputError(f"polygon {j} must be a list of numbers", path=path, record=where)
            if len(poly) < 6 or len(poly) % 2:
                raise InputError(f"polygon {j} has {len(poly) / 2:g} points; at least 3 (x, y) pairs are needed",
                                 path=path, record=where)
    elif isinstance(seg, dict):
        if "size" not in seg or "counts" not in seg:
            raise InputError("RLE needs 'size' and 'counts'", path=path, record=where)
        if not isinstance(seg["size"], list) or len(seg["size"]) != 2:
            raise InputError(f"RLE size must be [height, width], got {_show(seg['size'])}", path=path, record=where)
        for value in seg["size"]:
            check_number(value, "RLE size", path=path, record=where, integer=True, minimum=1)
        if not isinstance(seg["counts"], (str, list)):
            raise InputError("RLE counts must be a string or a list of run lengths", path=path, record=where)
        if isinstance(seg["counts"], list):
            for value in seg["counts"]:
                check_number(value, "RLE run length", path=path, record=where, integer=True, minimum=0)
            if sum(seg["counts"]) != seg["size"][0] * seg["size"][1]:
                raise InputError(f"RLE run lengths add up to {sum(seg['counts'])}, not height x width",
                                 path=path, record=where)
        if list(seg["size"]) != [image["height"], image["width"]]:
            raise InputError(f"RLE size {list(seg['size'])} disagrees with its image "
                             f"({image['height']}x{image['width']})", path=path, record=where)
    else:
        raise InputError("segmentation must be polygons or an RLE object", path=path, record=where)


def validate_dataset(data: Any, path: Path, require_annotations: bool = True) -> None:
    """Check a whole dataset dict; raise InputError on the first bad record."""
    if not isinstance(data, dict):
        raise InputError("top level must be an object with 'images' and 'categories'", path=path)
    required = ("images", "categories", "annotations") if require_annotations else ("images", "categories")
    for key in required:
        if key not in data:
            raise InputError(f"missing required key '{key}'", path=path)
        if not isinstance(data[key], list):
            raise InputError(f"'{key}' must be a list", path=path)

    for i, cat in enumerate(data["categories"]):
        _require_keys(cat, ("id", "name"), path, f"categories[{i}]")
    _check_ids_unique(data["categories"], path, "categories")
    for i, cat in enumerate(data["categories"]):
        where = f"categories[{i}] (id {cat['id']})"
        for key in ("image_count", "instance_count"):
            if key in cat:
                check_number(cat[key], key, path=path, record=where, integer=True, minimum=0)
        if "frequency" in cat and cat["frequency"] not in FREQUENCY_GROUPS:
            raise InputError(f"frequency must be 'r', 'c' or 'f', got {_show(cat['frequency'])}", path=path,
                             record=where)
    category_ids = {c["id"] for c in data["categories"]}

    if not _images_pass(data["images"], category_ids):
        _check_image_records(data["images"], category_ids, path)
    _check_ids_unique(data["images"], path, "images")
    images = {img["id"]: img for img in data["images"]}

    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise InputError("'annotations' must be a list", path=path)
    if not _annotations_pass(annotations, images, category_ids, path):
        _check_annotation_records(annotations, images, category_ids, path)
    _check_ids_unique(annotations, path, "annotations")


def _images_pass(images: list, category_ids: set) -> bool:
    """True when every image passes `_check_image_records`, decided a column at a time; False only
    means "run the per-record checks" (see `_annotations_pass`)."""
    if not images:
        return True
    try:
        if not _types_within(images, {dict}):
            return False
        list(map(itemgetter("id"), images))  # a missing key raises KeyError: the per-record checks name it
        if not all(_plain_name(img.get("file_name")) or img.get("file_name") is None
                   and isinstance(img.get("coco_url"), str) and _plain_name(img["coco_url"].rsplit("/", 1)[-1])
                   for img in images):
            return False
        for dim in ("width", "height"):
            values = list(map(itemgetter(dim), images))
            if not (_all_int64(values) and min(values) > 0 and max(values) <= 2 ** 31 - 1):
                return False
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            id_lists = [img.get(key, []) for img in images]
            if not _types_within(id_lists, {list}):
                return False
            ids = list(chain.from_iterable(id_lists))
            if not (_types_within(ids, {int}) and set(ids) <= category_ids):
                return False
        return True
    except KeyError:
        return False


_DRIVE = re.compile(r"[A-Za-z]:[/\\]")  # a Windows absolute path
_PLAIN_NAME = re.compile(r"[^\x00-\x1f\x7f/\\\\][^\x00-\x1f\x7f]*")


def _plain_name(name: Any) -> bool:
    """The fast path of `check_file_name`: a relative name without control characters or `..`."""
    return isinstance(name, str) and _PLAIN_NAME.fullmatch(name) is not None and ".." not in name \
        and bool(name.strip()) and not _DRIVE.match(name)


def _check_image_records(images: list, category_ids: set, path: Path) -> None:
    """The exact per-record checks of the images; raise InputError on the first bad one."""
    for i, img in enumerate(images):
        where = f"images[{i}]"
        _require_keys(img, ("id", "width", "height"), path, where)
        image_file_name(img, path=path, record=f"{where} (id {img['id']})")
        for dim in ("width", "height"):
            if not isinstance(img[dim], int) or isinstance(img[dim], bool) or img[dim] <= 0:
                raise InputError(f"{dim} must be a positive integer, got {_show(img[dim])}", path=path,
                                 record=where)
            check_number(img[dim], dim, path=path, record=where, integer=True, maximum=2 ** 31 - 1)
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if not isinstance(img.get(key, []), list):
                raise InputError(f"{key} must be a list of category ids", path=path,
                                 record=f"{where} (id {img['id']})")
            for cid in img.get(key, []):
                if not isinstance(cid, int) or isinstance(cid, bool) or cid not in category_ids:
                    raise InputError(f"{key} names unknown category id {cid}", path=path,
                                     record=f"{where} (id {img['id']})")


def _annotations_pass(annotations: list, images: dict[int, dict], category_ids: set, path: Path) -> bool:
    """True when every annotation passes `_check_annotation_records`, decided a column at a time
    (a few C-level passes and numpy checks instead of ~15 Python calls per record). It never
    raises: False only means "run the per-record checks", which find the first bad record and
    word its error, so both paths accept exactly the same files."""
    if not annotations:
        return True
    try:
        if not _types_within(annotations, {dict}):
            return False
        # A missing required key raises KeyError here; the per-record checks then name it.
        _, image_ids, cat_ids, boxes, segs = (list(map(itemgetter(key), annotations))
                                              for key in ("id", "image_id", "category_id", "bbox", "segmentation"))
        if not (_all_int64(image_ids) and _all_int64(cat_ids) and set(cat_ids) <= category_ids):
            return False
        rows = [images.get(i) for i in image_ids]
        if any(row is None for row in rows):
            return False

        if not _types_within(boxes, {list}) or not set(map(len, boxes)) <= {4}:
            return False
        box = _all_finite(list(chain.from_iterable(boxes)))
        if box is None:
            return False
        x, y, w, h = box.reshape(-1, 4).T
        width = np.array([row["width"] for row in rows], dtype=np.float64)
        height = np.array([row["height"] for row in rows], dtype=np.float64)
        tol = BOX_TOLERANCE_PX
        if not ((w > 0) & (h > 0) & (x >= -tol) & (y >= -tol)
                & (x + w <= width + tol) & (y + h <= height + tol)).all():
            return False

        if not _types_within(segs, {list}):  # RLE (crowd regions) and anything malformed take the exact check
            for seg, row in zip(segs, rows):
                if type(seg) is not list:
                    _validate_segmentation(seg, row, path, "")
            segs = [seg for seg in segs if type(seg) is list]
        if not all(segs):  # an empty polygon list
            return False
        polygons = list(chain.from_iterable(segs))
        if not _types_within(polygons, {list}):
            return False
        lengths = np.fromiter(map(len, polygons), dtype=np.int64, count=len(polygons))
        if not ((lengths >= 6) & (lengths % 2 == 0)).all():
            return False
        if _all_finite(list(chain.from_iterable(polygons))) is None:
            return False

        area = _all_finite([ann.get("area", 0) for ann in annotations])  # the key is optional
        if area is None or not (area >= 0).all():
            return False
        return all({ann[flag] for ann in annotations if flag in ann} <= {0, 1} for flag in ("iscrowd", "ignore"))
    except (InputError, KeyError, TypeError):  # TypeError: an unhashable id or flag
        return False


def _check_annotation_records(annotations: list, images: dict[int, dict], category_ids: set,
                              path: Path) -> None:
    """The exact per-record checks of the annotations; raise InputError on the first bad one."""
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        _require_keys(ann, ("id", "image_id", "category_id", "bbox", "segmentation"), path, where)
        where = f"annotations[{i}] (id {ann['id']})"
        for key in ("image_id", "category_id"):
            check_number(ann[key], key, path=path, record=where, integer=True)
        image = images.get(ann["image_id"])
        if image is None:
            raise InputError(f"unknown image id {ann['image_id']}", path=path, record=where)
        if ann["category_id"] not in category_ids:
            raise InputError(f"unknown category id {ann['category_id']}", path=path, record=where)
        box = ann["bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise InputError(f"bbox must be 4 finite numbers [x, y, w, h], got {_show(box)}", path=path,
                             record=where)
        x, y, w, h = box
        if w <= 0 or h <= 0:
            raise InputError(f"degenerate bbox {box} (width and height must be > 0)", path=path, record=where)
        tol = BOX_TOLERANCE_PX
        if x < -tol or y < -tol or x + w > image["width"] + tol or y + h > image["height"] + tol:
            raise InputError(f"bbox {box} lies outside its image ({image['width']}x{image['height']})",
                             path=path, record=where)
        _validate_segmentation(ann["segmentation"], image, path, where)
        if "area" in ann:  # reaches the area ranges of APs/APm/APl
            check_number(ann["area"], "area", path=path, record=where, minimum=0)
        for flag in ("iscrowd", "ignore"):
            if flag in ann and ann[flag] not in (0, 1):
                raise InputError(f"{flag} must be 0 or 1, got {_show(ann[flag])}", path=path, record=where)


def load_annotations(path: str | Path, require_annotations: bool = True) -> Annotations:
    """Read and validate an LVIS v1 or COCO instances json. Missing counts and frequency groups are
    computed from the annotations (the groups of a file that has them are kept)."""
    path = Path(path)
    with gc_paused():
        data = read_json(path)
        validate_dataset(data, path, require_annotations=require_annotations)
        data.setdefault("annotations", [])
        protocol = detect_protocol(data)
        if data["annotations"] or not all("frequency" in c for c in data["categories"]):
            stats = category_stats(data["annotations"], [c["id"] for c in data["categories"]])
            data["categories"] = [{**stats[c["id"]], **c} if "frequency" in c else {**c, **stats[c["id"]]}
                                  for c in data["categories"]]
        for c in data["categories"]:
            c.setdefault("image_count", 0)
            c.setdefault("instance_count", 0)
            c.setdefault("frequency", frequency_group(c["image_count"]))
        return Annotations(path=path, data=data, protocol=protocol)


# ---------------------------------------------------------------- masks (images: slsd_cli/data/images.py)


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Polygons, uncompressed or compressed RLE -> one compressed RLE."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """Binary mask [H, W] uint8 of one annotation."""
    return mask_utils.decode(segmentation_to_rle(ann["segmentation"], height, width)).astype(np.uint8)


def encode_mask(mask: np.ndarray | torch.Tensor) -> dict:
    """Binary [H, W] mask -> compressed RLE with a str `counts` (json-ready)."""
    if not isinstance(mask, np.ndarray):  # a torch.Tensor
        mask = mask.cpu().numpy()
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def dataset_dict(images: list[dict], annotations: list[dict], categories: list[dict],
                 info: dict | None = None) -> dict:
    """Assemble an LVIS-format dataset dict with counts and frequency groups recomputed."""
    data = {"info": info or {}, "images": images, "annotations": annotations, "categories": categories}
    return recount_categories(data)
