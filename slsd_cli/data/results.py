"""Results files (LVIS/COCO detections): the one reader, validator and writer.

File contract (the LVIS/COCO results format): a json list of records

    {"image_id": int, "category_id": int, "score": number in [0, 1],
     "bbox": [x, y, w, h] (finite, w and h >= 0),            # optional when a segmentation is given
     "segmentation": {"size": [h, w], "counts": str | [int, ...]}}   # RLE, optional

In memory a file is a `Detections`: arrays in file order (image_ids, category_ids, labels = the
contiguous class index of `Annotations.category_ids`, image_index = position in the sorted
`Annotations.image_ids`, scores, boxes [N, 4] xywh with NaN rows where a record has no box) and,
when the records carry masks, one compressed RLE dict per detection.

`read_results` is the only reader of detection files (`slsd eval`, `slsd calibrate`, plots). Every
numeric field that reaches a metric goes through one validator, `_check_columns`, whichever way the
file was parsed: ids integral, within int64 and known; scores finite and in [0, 1]; boxes finite
(a value that overflows to inf is refused) with w, h >= 0; RLE sizes a pair of ints equal to the
image size and run lengths that decode and cover the image. A bad record is an `InputError` naming
the file and the record: `detections.json: [12] (image_id 3): score 1.5 is outside [0, 1]`.

A file of plain box results (the four keys in one order in every record, decimal numbers) is
parsed without building Python objects (`slsd_cli.data.results_parser`, vectorised; a large file's numbers in two
processes): LVIS-sized files (6 M results, 560 MB) read in a few seconds in a fraction of
`json.load`'s memory. Anything else goes through `json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from slsd_cli.data.results_parser import all_of_types, box_columns
from slsd_cli.errors import InputError
from slsd_cli.io import atomic_path, gc_paused, read_json

if TYPE_CHECKING:
    from slsd_cli.data.lvis import Annotations

_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_RLE_CHUNK_CHARS = 32_768  # RLE characters validated per vectorised batch


@dataclass
class Detections:
    """Validated detections as arrays, in file order (see the module docstring)."""

    image_ids: np.ndarray     # int64 [N]
    category_ids: np.ndarray  # int64 [N]
    labels: np.ndarray        # int64 [N], index into Annotations.category_ids
    image_index: np.ndarray   # int64 [N], index into Annotations.image_ids (sorted)
    scores: np.ndarray        # float64 [N]
    boxes: np.ndarray         # float64 [N, 4] xywh, NaN rows for records without a box
    has_box: np.ndarray       # bool [N]
    segmentations: list[dict | None] | None = field(default=None)  # compressed RLE (str counts)
    path: str | None = None   # the file (or source) they were read from, for error messages

    def __len__(self) -> int:
        return int(self.scores.size)

    @property
    def all_have_masks(self) -> bool:
        return self.segmentations is not None and all(s is not None for s in self.segmentations)

    def records(self) -> list[dict]:
        """The detections as results records, in file order: image_id, category_id, score, and
        `bbox` [x, y, w, h] / `segmentation` (compressed RLE) where the detection has one."""
        out = []
        for i in range(len(self)):
            record = {"image_id": int(self.image_ids[i]), "category_id": int(self.category_ids[i]),
                      "score": float(self.scores[i])}
            if self.has_box[i]:
                record["bbox"] = self.boxes[i].tolist()
            if self.segmentations is not None and self.segmentations[i] is not None:
                record["segmentation"] = self.segmentations[i]
            out.append(record)
        return out

    def take(self, index: np.ndarray) -> "Detections":
        """The detections at `index` (in that order)."""
        segms = None if self.segmentations is None else [self.segmentations[i] for i in index.tolist()]
        return Detections(self.image_ids[index], self.category_ids[index], self.labels[index],
                          self.image_index[index], self.scores[index], self.boxes[index], self.has_box[index],
                          segms, self.path)

    def require(self, iou_type: str, path: str | Path | None = None) -> None:
        """Every detection must carry what `iou_type` matches: a box or a mask (bbox), a mask (segm)."""
        no_mask = (np.ones(len(self), bool) if self.segmentations is None
                   else np.fromiter((s is None for s in self.segmentations), bool, len(self)))
        if iou_type == "segm":
            missing = np.flatnonzero(no_mask)
            what = "iou type segm needs 'segmentation' (RLE) in every result"
        else:
            missing = np.flatnonzero(~self.has_box & no_mask)
            what = ("iou type bbox needs 'bbox' in every result" if self.segmentations is None
                    else "iou type bbox needs 'bbox' (or a segmentation) in every result")
        if missing.size:
            raise InputError(what, path=path or self.path,
                             record=_where(int(missing[0]), int(self.image_ids[missing[0]])))


def index_of(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Position of each value in `sorted_ids` (int64), -1 where absent. A dense table when the id
    range is small (LVIS image ids < 600k), else a binary search."""
    values = np.asarray(values, dtype=np.int64)
    if sorted_ids.size == 0:
        return np.full(values.shape, -1, dtype=np.int64)
    low, high = int(sorted_ids[0]), int(sorted_ids[-1])
    if high - low < (1 << 25):
        table = np.full(high - low + 1, -1, dtype=np.int64)
        table[sorted_ids - low] = np.arange(sorted_ids.size)
        # take + fix-up of the (rare) values outside: 3x faster than boolean-mask gathers at 6 M values
        out = table.take(values - low, mode="clip")
        outside = (values < low) | (values > high)
        if outside.any():
            out[outside] = -1
        return out
    pos = np.minimum(np.searchsorted(sorted_ids, values), sorted_ids.size - 1)
    return np.where(sorted_ids[pos] == values, pos, -1)


def _where(i: int, image_id: int | None = None) -> str:
    return f"[{i}]" if image_id is None else f"[{i}] (image_id {image_id})"


# ------------------------------------------------------------------ reading


def read_results(path: str | Path, annotations: "Annotations", *, masks: bool = True) -> Detections:
    """Read and validate a results file against `annotations`. With `masks=False` segmentations
    are skipped unread (callers that match boxes only: the fast reader then takes files with masks
    too)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    body = path.read_bytes()
    if not masks or b'"segmentation"' not in body:
        columns = box_columns(body)
        if columns is not None:
            del body
            # ids integral and below 2**53 (checked by box_columns): exact as int64
            ids = columns[:, :2].T.astype(np.int64, order="C")
            return _from_columns(columns, annotations, path, exact_ids=ids)
    with gc_paused():  # 300k result dicts at LVIS-val size: no cyclic-GC pass while they are built
        try:  # orjson when it takes the text: ~3x faster than json, the same values
            import orjson

            records = orjson.loads(body)
        except (ImportError, ValueError):  # orjson.JSONDecodeError is a ValueError
            records = None
        del body
        if records is not None:
            try:
                return from_records(records, annotations, path, masks=masks)
            except InputError:
                pass  # json's view of the file names the problem (orjson reads integers beyond 64 bits as floats)
    # json: its NaN/Infinity literals (which the validator then names) and its error messages
    return from_records(read_json(path), annotations, path, masks=masks)


def from_records(records: object, annotations: "Annotations", path: str | Path = "<detections>", *,
                 masks: bool = True) -> Detections:
    """Validate a parsed results list (as `json.load` gives it) and turn it into arrays."""
    if not isinstance(records, list):
        raise InputError("detections must be a json list of results", path=path)
    n = len(records)
    if n == 0:
        return _from_columns(np.zeros((0, 7)), annotations, path)
    try:
        image_ids = [r["image_id"] for r in records]
        category_ids = [r["category_id"] for r in records]
        scores = [r["score"] for r in records]
    except (KeyError, TypeError):
        image_ids = category_ids = scores = None
    if image_ids is None or not all_of_types(image_ids, (int,)) or not all_of_types(category_ids, (int,)) \
            or not all_of_types(scores, (int, float)):
        _raise_first_bad_record(records, path)
    try:
        ids = np.array([image_ids, category_ids], dtype=np.int64)
    except OverflowError:
        i = next(i for i, r in enumerate(records) if not _INT64_MIN <= r["image_id"] <= _INT64_MAX
                 or not _INT64_MIN <= r["category_id"] <= _INT64_MAX)
        raise InputError("image_id or category_id out of the int64 range", path=path, record=_where(i)) from None
    try:
        score_array = np.array(scores, dtype=np.float64)
    except OverflowError:  # an int score beyond float range
        i = next(i for i, s in enumerate(scores) if abs(s) > 1e308)
        raise InputError(f"score {scores[i]} is outside [0, 1]", path=path, record=_where(i)) from None
    del image_ids, category_ids, scores
    boxes = np.full((n, 4), np.nan)
    with_box = [i for i, r in enumerate(records) if "bbox" in r]
    if with_box:
        boxes[with_box] = _box_array([records[i]["bbox"] for i in with_box], with_box, path)
    has_box = np.zeros(n, dtype=bool)
    has_box[with_box] = True
    segms = None
    with_segm = [i for i, r in enumerate(records) if "segmentation" in r]
    if len(with_box) < n and len(set(with_box) | set(with_segm)) < n:
        present = set(with_box) | set(with_segm)
        i = next(i for i in range(n) if i not in present)
        raise InputError("a result needs 'bbox' or 'segmentation'", path=path, record=_where(i))
    columns = np.concatenate([ids.T.astype(np.float64), boxes, score_array[:, None]], axis=1)
    dets = _from_columns(columns, annotations, path, exact_ids=ids, has_box=has_box)
    if masks and with_segm:
        segms = [None] * n
        for i in with_segm:
            segms[i] = records[i]["segmentation"]
        dets.segmentations = _check_segmentations(segms, with_segm, dets, annotations, path)
    return dets



def _is(value: object, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


def _raise_first_bad_record(records: list, path: str | Path) -> None:
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise InputError("a result must be an object", path=path, record=_where(i))
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise InputError(f"a result needs 'image_id', 'category_id' and 'score' (no '{key}')",
                                 path=path, record=_where(i))
        for key in ("image_id", "category_id"):
            if not _is(r[key], (int,)):
                raise InputError(f"{key} must be an integer, got {r[key]!r}", path=path, record=_where(i))
        if not _is(r["score"], (int, float)):
            raise InputError(f"score must be a number, got {r['score']!r}", path=path, record=_where(i))
    raise AssertionError("no bad record found")  # pragma: no cover - callers checked there is one


def _box_array(boxes: list, rows: list[int], path: str | Path) -> np.ndarray:
    def bad(box) -> bool:
        return not (type(box) is list and len(box) == 4 and all(_is(v, (int, float)) for v in box))

    if all(type(b) is list and len(b) == 4 for b in boxes) and all_of_types([v for b in boxes for v in b], (int, float)):
        try:
            return np.array(boxes, dtype=np.float64)
        except OverflowError:  # an integer beyond float range: inf
            pass
        j = next(j for j, b in enumerate(boxes) if any(abs(v) > 1e308 for v in b))
    else:
        j = next(j for j, b in enumerate(boxes) if bad(b))
    raise InputError(f"malformed bbox {boxes[j]!r}: must be 4 finite numbers [x, y, w, h] with w, h >= 0",
                     path=path, record=_where(rows[j]))


def _from_columns(columns: np.ndarray, annotations: "Annotations", path: str | Path,
                  exact_ids: np.ndarray | None = None, has_box: np.ndarray | None = None) -> Detections:
    """Columns [N, 7] (image_id, category_id, x, y, w, h, score) -> validated Detections
    (`has_box`: which rows hold a box; default all)."""
    if exact_ids is None:
        image_ids, category_ids = _integral_ids(columns, path)
    else:
        image_ids, category_ids = exact_ids[0], exact_ids[1]
    image_index = index_of(image_ids, np.asarray(annotations.image_ids, dtype=np.int64))
    labels = index_of(category_ids, np.asarray(annotations.category_ids, dtype=np.int64))
    dets = Detections(image_ids, category_ids, labels, image_index, np.ascontiguousarray(columns[:, 6]),
                      np.ascontiguousarray(columns[:, 2:6]),
                      np.ones(len(columns), dtype=bool) if has_box is None else has_box, path=str(path))
    _check_columns(dets, path)
    return dets


def _integral_ids(columns: np.ndarray, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    ids = columns[:, :2]
    with np.errstate(invalid="ignore"):  # NaN, inf and |x| >= 2**63 cast to int64 min: refused below
        exact = ids.astype(np.int64)
    bad = ((exact != ids) | (exact == _INT64_MIN)).any(axis=1)  # also catches fractions
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"image_id and category_id must be integers within int64, got {_number(ids[i, 0])}, "
                         f"{_number(ids[i, 1])}", path=path, record=_where(i))
    return np.ascontiguousarray(exact[:, 0]), np.ascontiguousarray(exact[:, 1])


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _check_columns(dets: Detections, path: str | Path) -> None:
    """The one validator of the numbers that reach a metric (first failing record is named)."""
    def first(mask: np.ndarray) -> int | None:
        bad = np.flatnonzero(mask)
        return int(bad[0]) if bad.size else None

    if (i := first(dets.image_index < 0)) is not None:
        raise InputError(f"unknown image id {dets.image_ids[i]}", path=path, record=_where(i))
    where = lambda i: _where(i, int(dets.image_ids[i]))  # noqa: E731
    if (i := first(dets.labels < 0)) is not None:
        raise InputError(f"unknown category id {dets.category_ids[i]}", path=path, record=where(i))
    scores = dets.scores
    if (i := first(~np.isfinite(scores))) is not None:
        raise InputError(f"score is not a finite number ({scores[i]})", path=path, record=where(i))
    if (i := first((scores < 0) | (scores > 1))) is not None:
        raise InputError(f"score {_number(scores[i])} is outside [0, 1]", path=path, record=where(i))
    boxes = dets.boxes
    bad = dets.has_box & (~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] < 0) | (boxes[:, 3] < 0))
    if (i := first(bad)) is not None:
        raise InputError(f"malformed bbox {[_number(v) for v in boxes[i]]}: must be 4 finite numbers "
                         f"[x, y, w, h] with w, h >= 0", path=path, record=where(i))


# ------------------------------------------------------------------ masks


def _check_segmentations(segms: list, rows: list[int], dets: Detections, annotations: "Annotations",
                         path: str | Path) -> list[dict | None]:
    """Check the RLE of every record in `rows` (size = its image's [h, w], counts a string or a
    list of run lengths that decode to non-negative runs covering the image); uncompressed RLE is
    compressed."""
    from pycocotools import mask as mask_utils

    heights = np.array([annotations.images[i]["height"] for i in annotations.image_ids], dtype=np.int64)
    widths = np.array([annotations.images[i]["width"] for i in annotations.image_ids], dtype=np.int64)
    compressed: list[int] = []
    index = dets.image_index[rows]
    for i, h, w in zip(rows, heights[index].tolist(), widths[index].tolist()):
        seg = segms[i]
        if type(seg) is dict and type(seg.get("counts")) is str:  # the usual compressed RLE: checked below, at once
            size = seg.get("size")
            if type(size) is list and len(size) == 2 and type(size[0]) is int and type(size[1]) is int \
                    and size[0] == h and size[1] == w:
                compressed.append(i)
                continue
        where = _where(i, int(dets.image_ids[i]))
        if type(seg) is not dict or "size" not in seg or "counts" not in seg:
            raise InputError("segmentation must be an RLE object with 'size' and 'counts'", path=path, record=where)
        size, counts = seg["size"], seg["counts"]
        if type(size) is not list or len(size) != 2 or not all(_is(v, (int,)) for v in size):
            raise InputError(f"RLE size must be [height, width] (two integers), got {size!r}", path=path,
                             record=where)
        if size != [h, w]:
            raise InputError(f"RLE size {size} disagrees with image {dets.image_ids[i]} ({h}x{w})",
                             path=path, record=where)
        if type(counts) is str:
            compressed.append(i)
            continue
        if type(counts) is not list:
            raise InputError("RLE counts must be a string or a list of run lengths", path=path, record=where)
        if not all(_is(c, (int,)) and c >= 0 for c in counts) or sum(counts) != h * w:
            raise InputError(f"malformed RLE: run lengths must be non-negative integers summing to {h}x{w}",
                             path=path, record=where)
        rle = mask_utils.frPyObjects({"size": size, "counts": counts}, h, w)
        segms[i] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    if compressed:
        strings = [segms[i]["counts"] for i in compressed]
        index = dets.image_index[compressed]
        bad = _bad_rle_batches(strings, heights[index] * widths[index])
        if bad is not None:
            i = compressed[bad]
            raise InputError("malformed RLE: counts do not decode to runs covering the image", path=path,
                             record=_where(i, int(dets.image_ids[i])))
    return segms


def _bad_rle_batches(strings: list[str], areas: np.ndarray) -> int | None:
    """First index of a string `_bad_rle_strings` rejects, checking batches of ~_RLE_CHUNK_CHARS
    characters (the temporaries stay in cache: measured 2x faster than one batch)."""
    lengths = np.fromiter((len(s) for s in strings), np.int64, len(strings))
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(_RLE_CHUNK_CHARS, int(lengths.sum()), _RLE_CHUNK_CHARS))
    bounds = np.unique(np.concatenate(([0], bounds + 1, [len(strings)])))
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        bad = _bad_rle_strings(strings[start:stop], areas[start:stop])
        if bad.size:
            return start + int(bad[0])
    return None


def _bad_rle_strings(strings: Sequence[str], areas: np.ndarray) -> np.ndarray:
    """Indices of compressed RLE strings that do not decode (as pycocotools' `rleFrString` reads
    them) to non-negative runs summing to `areas[i]`. Vectorised over all characters: 6-bit
    characters -> tokens of 5-bit groups with a sign bit -> delta-decoded run lengths."""
    n = len(strings)
    lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=n)
    try:
        buf = np.frombuffer("".join(strings).encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:
        return np.array([i for i, s in enumerate(strings) if not s.isascii()][:1], dtype=np.int64)
    bad = lengths == 0
    full = np.flatnonzero(~bad)
    if not full.size:
        return np.flatnonzero(bad)
    char_start = (np.cumsum(lengths) - lengths)[full]
    char_end = char_start + lengths[full]                                   # exclusive
    bad_char = (buf < 48) | (buf > 48 + 63)
    bad[full] |= np.logical_or.reduceat(bad_char, char_start)
    c = (buf - np.uint8(48)) & np.uint8(63)
    more = (c & np.uint8(0x20)) != 0
    bad[full] |= more[char_end - 1]                                         # ends inside a token
    is_end = ~more
    is_end[char_end - 1] = True                                             # tokens never span strings
    token_end = np.flatnonzero(is_end)
    token_start = np.concatenate(([0], token_end[:-1] + 1))
    token_len = token_end - token_start + 1
    first_token = np.searchsorted(token_start, char_start)
    bad[full] |= np.logical_or.reduceat(token_len > 7, first_token)          # > 35 bits: not a run length
    # token values: 5 bits per character, least significant first (most tokens are one character)
    low = c & np.uint8(0x1F)
    x = low[token_start].astype(np.int64)
    longer = np.flatnonzero(token_len > 1)
    for j in range(1, 7):
        longer = longer[token_len[longer] > j]
        if not longer.size:
            break
        x[longer] += low[token_start[longer] + j].astype(np.int64) << (5 * j)
    negative = (c[token_end] & np.uint8(0x10)) != 0
    x[negative] -= np.int64(1) << (5 * np.minimum(token_len[negative], 7))  # sign-extend
    # delta decoding: cnts[0] = x[0], cnts[m] = x[m] + cnts[m-2] for m > 2, i.e. running sums along
    # the chains m = 1, 3, 5, ... and m = 2, 4, 6, ... of each string
    token_string = np.repeat(np.arange(full.size), np.diff(np.append(first_token, token_start.size)))
    m = np.arange(token_start.size) - first_token[token_string]
    odd = (m & 1) == 1
    even = ~odd & (m >= 2)
    counts = np.where(m == 0, x, 0)
    for chain in (odd, even):
        cs = np.cumsum(np.where(chain, x, 0))
        before = np.where(first_token > 0, cs[np.maximum(first_token - 1, 0)], 0)
        counts = np.where(chain, cs - before[token_string], counts)
    bad[full] |= np.logical_or.reduceat(counts < 0, first_token)
    bad[full] |= np.add.reduceat(counts, first_token) != areas[full]
    return np.flatnonzero(bad)


# ------------------------------------------------------------------ writing


def write_results(path: str | Path, records: Iterable[dict | str]) -> int:
    """Stream detections into a json list atomically (one record a line; strings are taken as
    already-serialised records). Returns the number written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("[")
        for record in records:
            text = record if isinstance(record, str) else json.dumps(record, allow_nan=False)
            out.write(("\n" if n == 0 else ",\n") + text)
            n += 1
        out.write("\n]\n" if n else "]\n")
    return n
