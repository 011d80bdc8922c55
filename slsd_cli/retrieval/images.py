"""The images `slsd retrieve` embeds: pool listing, query crops, decoding, hashing.

A pool is a folder of images (searched recursively, sorted by relative path), a text list of file
names, or an LVIS/COCO-style image-list json (`images: [{id, file_name | coco_url, width, height}]`,
other keys ignored); it is held column-wise (`PoolListing`). Query
items are object crops: a square around the box, enlarged by a context margin on each side, kept
inside the image, resized to the embedder's input size. Pool items are whole images resized to the
input size (aspect not kept, so no object at a border is cut off).

Decoding goes through the one image reader (`slsd_cli.data.images`: EXIF orientation, modes,
pixel limit; JPEG pool images are decoded at a reduced DCT scale when they are much larger than
the embedder input). `ItemDataset` decodes in DataLoader workers and never raises for
an unreadable file: it returns the error message so the caller can either stop with an InputError
naming the file or count and skip it (`--skip-bad-images`).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from slsd_cli.data.images import check_regular_file, decode_rgb, displayed_size, open_image
from slsd_cli.data.lvis import image_file_name
from slsd_cli.errors import InputError
from slsd_cli.io import read_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
HASH_BYTES = 16


@dataclass(frozen=True)
class Item:
    """One thing to embed: an image file, optionally a crop box [x, y, w, h] of it."""

    path: str
    box: tuple[float, float, float, float] | None = None
    expected_size: tuple[int, int] | None = None  # (width, height) the listing claims, checked on decode
    record: str | None = None                      # names the item in error messages

    def key(self) -> str:
        box = "" if self.box is None else ",".join(f"{v:.3f}" for v in self.box)
        size = "" if self.expected_size is None else f"{self.expected_size[0]}x{self.expected_size[1]}"
        return f"{self.path}|{box}|{size}"


class PoolListing:
    """The pool, column-wise: file names in one utf-8 blob with offsets, ids and claimed sizes in
    numpy arrays — about 80 bytes per image and no Python object per image, so a 100M-image pool
    lists in ~8 GB. `listing[i]` is the `Item` to embed; `file_name(i)`, `image_id(i)` and
    `size(i)` read one record."""

    def __init__(self, root: Path, blob: bytes, offsets: np.ndarray, ids: np.ndarray, sizes: np.ndarray):
        self.root = Path(root)
        self.blob = blob
        self.offsets = offsets
        self.ids = ids
        self.sizes = sizes  # int32 [N, 2] (width, height); 0 = not given
        self._root_str = str(self.root)

    @classmethod
    def from_names(cls, root: Path, names, ids=None, sizes=None) -> "PoolListing":
        blob = bytearray()
        offsets = [0]
        for name in names:
            blob += name.encode("utf-8")
            offsets.append(len(blob))
        n = len(offsets) - 1
        ids = np.arange(1, n + 1, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        sizes = np.zeros((n, 2), dtype=np.int32) if sizes is None else np.asarray(sizes, dtype=np.int32)
        return cls(root, bytes(blob), np.asarray(offsets, dtype=np.int64), ids, sizes)

    def __len__(self) -> int:
        return len(self.ids)

    def file_name(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].decode("utf-8")

    def path(self, i: int) -> str:
        return os.path.join(self._root_str, self.file_name(i))

    def image_id(self, i: int) -> int:
        return int(self.ids[i])

    def size(self, i: int) -> tuple[int, int] | None:
        w, h = int(self.sizes[i, 0]), int(self.sizes[i, 1])
        return (w, h) if w > 0 and h > 0 else None

    def __getitem__(self, i: int) -> Item:
        return Item(self.path(i), None, self.size(i), record=f"pool image id {int(self.ids[i])}")

    def digest(self) -> str:
        """Identifies the listing (root, names, ids, sizes) for the embedding cache key."""
        d = hashlib.sha256()
        d.update(self._root_str.encode())
        d.update(self.blob)
        for array in (self.offsets, self.ids, self.sizes):
            d.update(np.ascontiguousarray(array).tobytes())
        return d.hexdigest()


def content_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


def file_content_hash(path: str | Path) -> bytes:
    return content_hash(Path(path).read_bytes())


def list_pool(pool: str | Path, pool_images: str | Path | None, first_folder_id: int = 1) -> PoolListing:
    """The pool as a `PoolListing`, from one of three forms (one reader each):

    * a folder (`read_pool_folder`): image files found recursively, sorted by relative path;
    * a `.txt` list (`read_pool_list`): one file name per line, relative to `pool_images` (streamed,
      the form for very large pools);
    * an LVIS/COCO-style json (`read_pool_json`): `images: [{id, file_name | coco_url, width,
      height}]`, names relative to `pool_images`.

    Folder and text pools get ids `first_folder_id, first_folder_id + 1, ...` in listing order (the
    caller starts them after the labeled set's largest id so the two never collide)."""
    pool = Path(pool)
    if pool.is_dir():
        return read_pool_folder(pool, first_folder_id)
    if not pool.exists():
        raise InputError("pool not found (a folder of images, a .txt list or an image-list json)", path=pool)
    root = Path(pool_images).resolve() if pool_images is not None else pool.resolve().parent
    if not root.is_dir():
        raise InputError("pool images folder not found", path=root)
    if pool.suffix.lower() == ".txt":
        return read_pool_list(pool, root, first_folder_id)
    return read_pool_json(pool, root)


def read_pool_folder(folder: Path, first_id: int) -> PoolListing:
    """The image files below `folder` (by suffix), sorted by relative path, ids from `first_id`."""
    root = folder.resolve()
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                names.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    if not names:
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the pool folder", path=folder)
    names.sort()
    return PoolListing.from_names(root, names, ids=np.arange(len(names), dtype=np.int64) + first_id)


def read_pool_list(path: Path, root: Path, first_id: int) -> PoolListing:
    """A text list, one file name (relative to `root`) per non-empty line, streamed into the blob
    without a Python string per name; ids from `first_id`."""
    blob = bytearray()
    offsets = [0]
    with open(path, "rb") as handle:
        for line in handle:
            line = line.strip()
            if line:
                blob += line
                offsets.append(len(blob))
    n = len(offsets) - 1
    if n == 0:
        raise InputError("the pool list names no images", path=path)
    try:
        bytes(blob).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"the pool list is not utf-8 text ({exc})", path=path) from exc
    return PoolListing(root, bytes(blob), np.asarray(offsets, dtype=np.int64),
                       np.arange(n, dtype=np.int64) + first_id, np.zeros((n, 2), dtype=np.int32))


def read_pool_json(path: Path, root: Path) -> PoolListing:
    """An image-list json (`images: [...]` or a bare list): unique integer ids, a file name (or
    coco_url) each, optional positive width / height (0 = not given)."""
    data = read_json(path)
    records = data.get("images") if isinstance(data, dict) else data if isinstance(data, list) else None
    if not isinstance(records, list):
        raise InputError("a pool json needs an 'images' list", path=path)
    if not records:
        raise InputError("the pool json lists no images", path=path)
    seen: set[int] = set()
    names, ids = [], np.zeros(len(records), dtype=np.int64)
    sizes = np.zeros((len(records), 2), dtype=np.int32)
    for i, rec in enumerate(records):
        where = f"images[{i}]"
        if not isinstance(rec, dict) or "id" not in rec:
            raise InputError("missing required key 'id'", path=path, record=where)
        if not isinstance(rec["id"], int) or isinstance(rec["id"], bool):
            raise InputError(f"id must be an integer, got {rec['id']!r}", path=path, record=where)
        if not -2 ** 63 <= rec["id"] < 2 ** 63:
            raise InputError(f"id {rec['id']} does not fit in 64 bits", path=path, record=where)
        if rec["id"] in seen:
            raise InputError(f"duplicate id {rec['id']}", path=path, record=where)
        seen.add(rec["id"])
        for j, dim in enumerate(("width", "height")):
            value = rec.get(dim)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise InputError(f"{dim} must be a positive integer, got {value!r}", path=path, record=where)
            sizes[i, j] = value or 0
        ids[i] = rec["id"]
        names.append(image_file_name(rec, path=path, record=where))  # a relative name, checked
    return PoolListing.from_names(root, names, ids=ids, sizes=sizes)


def crop_window(box: tuple[float, float, float, float], width: int, height: int,
                margin: float) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) in pixels: a square of side max(w, h) * (1 + 2 * margin) centred on the box,
    shifted to lie inside the image and clipped where the image is smaller than the square."""
    x, y, w, h = box
    side = max(w, h) * (1.0 + 2.0 * margin)
    cw = max(1, min(width, int(round(side))))
    ch = max(1, min(height, int(round(side))))
    cx, cy = x + w / 2.0, y + h / 2.0
    x0 = int(round(min(max(cx - cw / 2.0, 0.0), width - cw)))
    y0 = int(round(min(max(cy - ch / 2.0, 0.0), height - ch)))
    return x0, y0, cw, ch


class ItemDataset(torch.utils.data.Dataset):
    """Decode, crop and resize items; `hash_files` also returns each file's content hash."""

    def __init__(self, items, indices, input_size: tuple[int, int], margin: float,
                 hash_files: bool):
        self.items = items
        self.indices = indices
        self.input_size = tuple(input_size)
        self.margin = margin
        self.hash_files = hash_files

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self.indices[i])
        item = self.items[index]
        out: dict[str, Any] = {"index": index, "ok": False, "error": "", "size": (0, 0),
                               "hash": bytes(HASH_BYTES),
                               # numpy zeros: torch.zeros would start torch's thread pool per image
                               "image": torch.from_numpy(np.zeros((3, *self.input_size), dtype=np.uint8))}
        try:
            data = check_regular_file(item.path).read_bytes()  # never opens a FIFO or a device
        except InputError as exc:
            out["error"] = exc.message
            return out
        except OSError as exc:
            out["error"] = "image file not found" if isinstance(exc, FileNotFoundError) else f"unreadable file ({exc})"
            return out
        if self.hash_files:
            out["hash"] = content_hash(data)
        try:
            with open_image(io.BytesIO(data), path=item.path, record=item.record) as pil:  # the one reader
                width, height = displayed_size(pil)
                if item.expected_size is not None and item.expected_size != (width, height):
                    out["size"] = (width, height)
                    out["error"] = (f"image is {width}x{height} but its record says "
                                    f"{item.expected_size[0]}x{item.expected_size[1]}")
                    return out
                if item.box is None:
                    # JPEG: decode at a reduced DCT scale that still covers twice the input size (much
                    # faster for large pool images); other formats ignore the request
                    pil.draft("RGB", (2 * self.input_size[1], 2 * self.input_size[0]))
                rgb = decode_rgb(pil, path=item.path, record=item.record)
                if item.box is not None:
                    x0, y0, cw, ch = crop_window(item.box, width, height, self.margin)
                    rgb = rgb.crop((x0, y0, x0 + cw, y0 + ch))
                # Pillow's bilinear resize widens its kernel when shrinking (antialiased)
                resized = rgb.resize((self.input_size[1], self.input_size[0]), Image.BILINEAR)
                # [3, H, W] with numpy: a torch permute/contiguous would wake torch's thread pool for
                # every image, which costs more than the copy on a busy machine
                pixels = np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))
        except InputError as exc:  # the reader's one-line message (unreadable, truncated, too large)
            out["error"] = exc.message
            return out
        except Exception as exc:  # Pillow raises many types while cropping and resizing too
            message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            out["error"] = f"unreadable image ({message})"
            return out
        out["size"] = (width, height)
        out["image"] = torch.from_numpy(pixels)
        out["ok"] = True
        return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.int64),
        "ok": torch.tensor([b["ok"] for b in batch], dtype=torch.bool),
        "error": [b["error"] for b in batch],
        "size": torch.tensor([b["size"] for b in batch], dtype=torch.int32),
        "hash": torch.tensor([list(b["hash"]) for b in batch], dtype=torch.uint8),
        "image": torch.stack([b["image"] for b in batch]),
    }
