"""The fast reader of plain box results files: numbers parsed without building Python objects.

`box_columns(body)` takes the bytes of a results json whose records hold exactly the four box keys
(`image_id`, `category_id`, `bbox`, `score`, one order in every record; segmentations are cut out
first) and returns its numbers as a [N, 7] float64 array, or None when the file is anything else
(the caller, `slsd_cli.data.results.read_results`, then parses it with json). Structure is checked
in 1 MB chunks; numbers are parsed vectorised, in two forked processes for files of 50 MB or more.
LVIS-sized files (6 M results, 560 MB) read in a few seconds, in a fraction of `json.load`'s memory.
Values are not validated here: `read_results` checks every column, whichever reader parsed it.
"""

from __future__ import annotations

import mmap
import os
import re
import threading

import numpy as np


def all_of_types(values: list, types: tuple[type, ...]) -> bool:
    """Every value is an instance of `types` but not a bool (checked once per distinct type)."""
    return all(issubclass(t, types) and not issubclass(t, bool) for t in set(map(type, values)))


_RESULT_KEYS = (b"image_id", b"category_id", b"bbox", b"score")
# A segmentation object ({"size": [h, w], "counts": ...}) with the comma that joins it to its record.
_SEGMENTATION = re.compile(rb',\s*"segmentation"\s*:\s*\{[^{}]*\}|"segmentation"\s*:\s*\{[^{}]*\}\s*,')
_NUMBER_BYTES = b"0123456789.-"
_WHITESPACE = b" \t\n\r"
_NOT_NUMBERS_OR_COMMAS = bytes(b for b in range(256) if b not in _NUMBER_BYTES + b"," + _WHITESPACE)
_TO_SPACES = bytes(b if b in _NUMBER_BYTES else 32 for b in range(256))
_EXACT_INT = 2.0 ** 53  # ids below this survive float64 exactly; larger ones take the json path
_PIECE = 1 << 18        # bytes of a file converted at once: its Python floats stay in cache (2x faster than 16 MB)
_SKELETON_CHUNK = 1 << 20  # bytes of a file structure-checked at once (`_count_records`)
_PARALLEL_BYTES = 50 << 20  # files this large are parsed in two processes (`_parse_halves`)


def box_columns(body: bytes) -> np.ndarray | None:
    """Columns [N, 7] (image_id, category_id, x, y, w, h, score) of a results file's bytes, or None
    when they are not plain box results (the caller then uses `json`).

    The check is exact on structure: removing every digit, '.', '-' and whitespace (and any
    segmentation object) must leave `[R,R,...,R]` where R is one record's skeleton
    `{"image_id":,"category_id":,"bbox":[,,,],"score":}` (the four keys in any order, the same
    order in every record); what is left after removing everything but numbers, commas and
    whitespace must then parse as exactly 7 json numbers per record (`_parse_numbers`).
    """
    if b'"segmentation"' in body:
        body = _SEGMENTATION.sub(b"", body)
    first = body.find(b"}")
    if first < 0:  # no record: box results only when the skeleton is `[]`
        return np.zeros((0, 7)) if _skeleton(body) == b"[]" else None
    head = _skeleton(body[:first + 1])
    if head[:1] != b"[":
        return None
    record = head[1:]
    positions = {key: record.find(b'"' + key + b'":') for key in _RESULT_KEYS}
    if min(positions.values()) < 0:
        return None
    order = sorted(_RESULT_KEYS, key=positions.__getitem__)
    expected = b"{" + b",".join(b'"' + k + b'":' + (b"[,,,]" if k == b"bbox" else b"") for k in order) + b"}"
    if record != expected:
        return None
    n = _count_records(body, record)
    if n is None:
        return None
    column, at = {}, 0
    for key in order:
        width = 4 if key == b"bbox" else 1
        column[key] = slice(at, at + width)
        at += width
    values = _parse_numbers(body, 7 * n, int_columns=(column[b"image_id"].start, column[b"category_id"].start))
    if values is None:
        return None
    values = values.reshape(n, 7)
    order = np.r_[column[b"image_id"], column[b"category_id"], column[b"bbox"], column[b"score"]]
    if (order != np.arange(7)).any():  # the usual key order needs no copy (336 MB at LVIS size)
        values = values[:, order]
    if (np.abs(values[:, :2]) >= _EXACT_INT).any():
        return None
    return values


def _skeleton(body: bytes) -> bytes:
    return body.translate(None, delete=_NUMBER_BYTES + _WHITESPACE)


def _count_records(body: bytes, record: bytes) -> int | None:
    """n when the skeleton of `body` (`_skeleton`) is `[R,R,...,R]` with n records R = `record`, else
    None. Checked a chunk of `body` at a time against the periodic pattern `R,R,...`: no skeleton
    of the whole file (300 MB at LVIS size, and its page faults)."""
    last = body.rfind(b"]")
    if last < 0 or _skeleton(body[last + 1:]):
        return None
    step = len(record) + 1
    pattern = (record + b",") * (_SKELETON_CHUNK // step + 2)  # holds any chunk's skeleton at any phase
    seen = 0  # skeleton characters of body[:last] so far, "[" included
    for pos in range(0, last, _SKELETON_CHUNK):
        part = _skeleton(body[pos:min(pos + _SKELETON_CHUNK, last)])
        if seen == 0 and part:
            if part[:1] != b"[":
                return None
            part, seen = part[1:], 1
        if part and not pattern.startswith(part, (seen - 1) % step):
            return None
        seen += len(part)
    n, rest = divmod(seen, step)  # "[" + n records and n - 1 commas: n * step characters
    return n if n and not rest else None


def _parse_numbers(body: bytes, count: int, int_columns: tuple[int, ...] = ()) -> np.ndarray | None:
    """The `count` numbers of a structure-checked results file, in file order, or None when a token
    is not one json number, or a number at `int_columns` of a 7-number record is not an integer
    (orjson: not an integer token; numpy: not integral); the json path then names the record.
    Everything but numbers, commas and whitespace is dropped, which leaves a comma-separated list
    of json numbers; orjson parses it (correctly rounded, as `json`) piece by piece, else numpy's
    decimal parser. A large file is parsed in two processes, half each (`_parse_halves`)."""
    try:
        import orjson  # noqa: F401
    except ImportError:  # numpy's parser: ~3x slower; separators checked by the count
        values = _parse_numbers_numpy(body.translate(None, delete=_NOT_NUMBERS_OR_COMMAS), count)
        if values is None or any((values[c::7] != np.trunc(values[c::7])).any() for c in int_columns):
            return None  # not integral (or NaN/inf): the json path names the record
        return values
    # fork only from a single-threaded process: a lock another thread holds would stay held in the child
    if len(body) >= _PARALLEL_BYTES and hasattr(os, "fork") and threading.active_count() == 1:
        return _parse_halves(body, count, int_columns)
    return _parse_serial(body, count, int_columns)


def _parse_serial(body: bytes, count: int, int_columns: tuple[int, ...]) -> np.ndarray | None:
    out = np.empty(count, dtype=np.float64)
    return out if _parse_span(body, 0, len(body), out, 0, int_columns) == count else None


def _parse_span(body: bytes, start: int, stop: int, out: np.ndarray, at: int,
                int_columns: tuple[int, ...]) -> int | None:
    """Parse the numbers of `body[start:stop]` (cut at commas: in a structure-checked file every
    comma separates two numbers) into `out[at:]`; -> how many, or None (see `_parse_numbers`).
    `at` is the file-order index of the first one, which places the integer columns."""
    import orjson

    first = at
    pos = start  # where the next piece starts
    while pos < stop:
        cut = body.find(b",", pos + _PIECE, stop)
        cut = stop if cut < 0 else cut
        text = body[pos:cut].translate(None, delete=_NOT_NUMBERS_OR_COMMAS)
        try:  # one piece (a copy of ~_PIECE bytes) parsed as a json list
            numbers = orjson.loads(b"[" + text + b"]")
            if type(numbers) is not list or at + len(numbers) > out.size \
                    or any(not all_of_types(numbers[(c - at) % 7::7], (int,)) for c in int_columns):
                return None
            # fromiter: no dtype discovery (measured 2x faster than np.array on these lists)
            out[at:at + len(numbers)] = np.fromiter(numbers, dtype=np.float64, count=len(numbers))
        except (orjson.JSONDecodeError, OverflowError, TypeError, ValueError):  # not one json number per token
            return None
        at += len(numbers)
        del numbers
        pos = cut + 1
    return at - first


def _parse_halves(body: bytes, count: int, int_columns: tuple[int, ...]) -> np.ndarray | None:
    """`_parse_numbers` in two processes (wall time: parsing is ~60% of `slsd calibrate` on an LVIS-
    sized file): a forked child parses the second half of `body` into the end of a shared array
    while this process parses the first half into its start. The child counts its numbers itself
    (commas + 1) to know where they go and reports the count in the array's last slot; the halves
    must add up to `count`."""
    mid = body.find(b",", len(body) // 2)
    if mid < 0:
        return _parse_serial(body, count, int_columns)
    shared = mmap.mmap(-1, 8 * (count + 1))  # anonymous and MAP_SHARED: the child's writes land here
    values, n_child = np.frombuffer(shared, dtype=np.float64)[:count], np.frombuffer(shared, np.int64, 1, 8 * count)
    try:
        pid = os.fork()
    except OSError:  # no process to spare: one is enough
        return _parse_serial(body, count, int_columns)
    if pid == 0:  # the child: never returns into the caller
        status = 1
        try:
            n = body.count(b",", mid + 1) + 1
            if n <= count and _parse_span(body, mid + 1, len(body), values, count - n, int_columns) == n:
                n_child[0] = n
                status = 0
        finally:
            os._exit(status)
    try:
        n_first = _parse_span(body, 0, mid, values, 0, int_columns)
    finally:
        _, status = os.waitpid(pid, 0)
    if n_first is None or status != 0 or n_first + int(n_child[0]) != count:
        return None
    return values


def _parse_numbers_numpy(text: bytes, count: int) -> np.ndarray | None:
    import warnings

    tokens = text.translate(_TO_SPACES)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # older numpy warns and stops early: the count check catches it
            values = np.fromstring(tokens, dtype=np.float64, sep=" ")
    except ValueError:  # a token that is not a number ("1.2.3", "-")
        return None
    return values if values.size == count else None
