"""Derived annotation files over a shared synth set: subsets written beside an `images` link, so the
shared folder itself is never written to."""

from __future__ import annotations

import json
from pathlib import Path

from slsd_cli.data.lvis import recount_categories


def linked_copy(synth: Path, out: Path) -> Path:
    """`out/` with an `images` symlink to the synth set's images: annotation files written there
    resolve their images as the originals do."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").symlink_to(synth / "images", target_is_directory=True)
    return out


def first_annotated(src: Path, dst: Path, n: int) -> Path:
    """The annotations of `src` restricted to its first `n` annotated images (by id), counts recounted."""
    data = json.loads(src.read_text())
    keep = set(sorted({a["image_id"] for a in data["annotations"]})[:n])
    dst.write_text(json.dumps(recount_categories(
        {**data, "images": [i for i in data["images"] if i["id"] in keep],
         "annotations": [a for a in data["annotations"] if a["image_id"] in keep]})))
    return dst
