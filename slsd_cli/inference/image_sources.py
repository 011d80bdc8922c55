"""The images `slsd predict` runs on: folders, glob patterns, image files and image-list jsons ->
image records {"id", "file_name" (absolute), "height", "width"}.

Every source is checked before any work: an image-list record needs an integer id within int64
(never a boolean) and a non-empty `file_name` (or `coco_url`); every file must be a regular file
(a FIFO is refused without being opened) whose header reads (`slsd_cli.data.images`). Globs are
expanded here, not by `glob.glob`: each directory is entered once by its real path (a symlink loop
is walked once, never forever), only regular files are kept, and a file reached twice through
symlinked folders is listed once.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from pathlib import Path
from typing import Any

from slsd_cli.data.images import image_size
from slsd_cli.data.lvis import INT64_MAX, check_number
from slsd_cli.errors import InputError
from slsd_cli.io import read_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_MAGIC = re.compile(r"[*?[]")


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _entries(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def expand_glob(pattern: str) -> list[Path]:
    """The regular files matching `pattern` (`glob`'s syntax: `*`, `?`, `[...]` within a path part,
    `**` for any number of folders; names starting with '.' only when the part does), sorted by
    path, each real file once."""
    parts = pattern.split(os.sep)
    first = next((k for k, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
    root = os.sep.join(parts[:first]) or (os.sep if pattern.startswith(os.sep) else os.curdir)
    rest = [part for part in parts[first:] if part]
    found: list[str] = []
    visited: set[tuple[str, int]] = set()

    def walk(folder: str, k: int) -> None:
        key = (os.path.realpath(folder), k)
        if key in visited:  # each folder once per pattern part: a symlink loop ends here
            return
        visited.add(key)
        part, last = rest[k], k == len(rest) - 1
        if part == "**" and not last:
            walk(folder, k + 1)  # ** matching no folder at all
        for name in _entries(folder):
            path = os.path.join(folder, name)
            hidden = name.startswith(".")
            if part == "**":
                if hidden:
                    continue
                if last and _is_regular(path):
                    found.append(path)
                elif _is_dir(path):
                    walk(path, k)  # one folder deeper, still inside **
            elif fnmatch.fnmatchcase(name, part) and (not hidden or part.startswith(".")):
                if last:
                    if _is_regular(path):
                        found.append(path)
                elif _is_dir(path):
                    walk(path, k + 1)

    if rest:
        walk(root, 0)
    elif _is_regular(root):
        found.append(root)
    unique: dict[str, Path] = {}
    for path in sorted(found):
        unique.setdefault(os.path.realpath(path), Path(path))
    return list(unique.values())


def _list_entry(img: Any, i: int, path: Path) -> tuple[int, str]:
    """(id, file name) of one record of an image-list json, checked."""
    where = f"images[{i}]"
    if not isinstance(img, dict):
        raise InputError("each image must be an object with 'id' and 'file_name'", path=path, record=where)
    if "id" not in img:
        raise InputError("missing required key 'id'", path=path, record=where)
    image_id = check_number(img["id"], "id", path=path, record=where, integer=True)
    key = "file_name" if img.get("file_name") is not None or "coco_url" not in img else "coco_url"
    name = img.get(key)
    if not isinstance(name, str) or not name.strip():
        shown = "missing" if key not in img else repr(name)
        raise InputError(f"{key} must be a non-empty string, got {shown}", path=path, record=f"{where} (id {image_id})")
    return image_id, name if key == "file_name" else name.rsplit("/", 1)[-1]


def _from_list(path: Path, images_dir: str | Path | None) -> list[tuple[int | None, Path]]:
    data = read_json(path)
    base = Path(images_dir) if images_dir is not None else path.parent
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return [(image_id, base / name) for image_id, name in
                (_list_entry(img, i, path) for i, img in enumerate(data["images"]))]
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        empty = next((i for i, x in enumerate(data) if not x.strip()), None)
        if empty is not None:
            raise InputError("an image path must be a non-empty string", path=path, record=f"[{empty}]")
        return [(None, base / x) for x in data]
    raise InputError("an image list is a json list of paths or {\"images\": [{\"id\", \"file_name\"}]}", path=path)


def _from_source(source: str, images_dir: str | Path | None) -> list[tuple[int | None, Path]]:
    path = Path(source)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and _is_regular(str(f)))
        if not files:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder", path=path)
        return [(None, f) for f in files]
    if path.suffix.lower() == ".json" and path.is_file():
        return _from_list(path, images_dir)
    if path.exists() or path.is_symlink():
        return [(None, path)]  # an image file (a FIFO or a broken link is refused when its size is read)
    files = [f for f in expand_glob(source) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise InputError("no such image, folder, image-list json or matching glob", path=source)
    return [(None, f) for f in files]


def _assign_ids(given: list[tuple[int | None, Path]]) -> list[tuple[int, Path]]:
    """Ids for images given without one: their file names' numbers when every stem is a distinct
    integer within int64 (COCO's 000000039769.jpg -> 39769), else 1..N in the given order."""
    if all(i is not None for i, _ in given):
        return given  # type: ignore[return-value]
    if any(i is not None for i, _ in given):
        raise InputError("mix an image-list json with ids and other image sources: give one or the other")
    stems = [p.stem for _, p in given]
    numeric = (all(s.isascii() and s.isdigit() for s in stems) and all(int(s) <= INT64_MAX for s in stems)
               and len({int(s) for s in stems}) == len(stems))
    return [(int(p.stem) if numeric else k + 1, p) for k, (_, p) in enumerate(given)]


def collect_images(sources: list[str], images_dir: str | Path | None = None) -> list[dict]:
    """Image records {"id", "file_name" (absolute path), "height", "width"} from folders, glob
    patterns, image files and image-list jsons (a json list of paths, or an LVIS/COCO-style
    {"images": [{"id", "file_name" | "coco_url"}]} whose ids are kept; relative names resolve
    against `images_dir`, default the json's folder), sorted by id. Sizes are the displayed ones
    (EXIF orientation applied), read from the headers."""
    given: list[tuple[int | None, Path]] = []
    for source in sources:
        given += _from_source(source, images_dir)
    records, seen = [], set()
    for image_id, path in _assign_ids(given):
        if image_id in seen:
            raise InputError(f"image id {image_id} given twice", path=path)
        seen.add(image_id)
        width, height = image_size(path, record=f"image id {image_id}")
        records.append({"id": int(image_id), "file_name": str(path.resolve()), "height": int(height),
                        "width": int(width)})
    return sorted(records, key=lambda r: r["id"])
