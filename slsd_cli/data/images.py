"""The one image reader: every image slsd reads (training, eval, predict, prototypes, retrieve,
plots) is opened here, so all of them see the same pixels.

What it does, in the order the reference (detectron2's `read_image`, which EVA-02 evaluates with)
does it:
- refuses anything but a regular file before opening it (a FIFO would block the read forever);
- reads the header and refuses an image over `MAX_PIXELS` before decoding (a decompression bomb
  costs nothing until its pixels are allocated; Pillow's own `DecompressionBombError` is turned
  into the same one-line message);
- applies the EXIF orientation (a phone JPEG tagged "rotate 90°" is read upright: its width and
  height are the displayed ones, which are also what COCO/LVIS records give);
- converts to 8-bit RGB with Pillow's `convert("RGB")` (palette, grayscale, RGBA, CMYK, ... exactly
  as the reference), except 16-bit grayscale ("I;16" modes): Pillow clips those at 255, which turns
  a 16-bit picture almost white, so they keep their high byte instead (v >> 8, what Pillow itself
  does for 16-bit colour PNGs), and a 16-bit picture gives the pixels of the same picture in 8 bits.

A missing, unreadable or truncated file is an `InputError` naming it (one line).
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from slsd_cli.errors import InputError

# Largest image accepted, in pixels (an 11,585-pixel square): above every camera and scan slsd is
# meant for, below Pillow's own bomb limit (2 x 89.5M), so this check, not Pillow's, answers first.
MAX_PIXELS = 1 << 27
EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the Pillow transpose that shows the image upright (EXIF 2.3, tag 274)
_ORIENTATION_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                          6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}
_SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N")


def check_regular_file(path: str | Path, record: Any = None) -> Path:
    """`path` when it names a regular file (a symlink to one is fine); else the one-line error:
    missing, or something that is not a file (a folder, a FIFO, a device) and must not be opened."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError("image file not found", path=path, record=record) from None
    except OSError as exc:
        raise InputError(f"unreadable image ({exc.strerror or exc})", path=path, record=record) from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise InputError(f"not an image file ({kind})", path=path, record=record)
    return path


def _orientation(img) -> int:
    try:
        return int(img.getexif().get(EXIF_ORIENTATION) or 1)
    except Exception:  # a broken EXIF block: read the pixels as stored, as the reference does
        return 1


def displayed_size(img) -> tuple[int, int]:
    """(width, height) of an opened image as it is shown and read: EXIF orientation applied."""
    width, height = img.size
    return (height, width) if _orientation(img) in (5, 6, 7, 8) else (width, height)


def _problem(exc: BaseException) -> str:
    """Pillow's message on one line (it raises many types: OSError, SyntaxError, ValueError, ...)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return "the file is truncated" if "truncated" in text else text


@contextlib.contextmanager
def open_image(source: str | Path | BinaryIO, *, path: str | Path | None = None, record: Any = None,
               max_pixels: int = MAX_PIXELS) -> Iterator[Any]:
    """The opened Pillow image (header read, nothing decoded yet) of a file path, or of a file
    object holding its bytes (then `path` names it in errors); refused when not a regular file or
    over `max_pixels`. Decode it with `decode_rgb`."""
    from PIL import Image

    path = Path(path if path is not None else source)
    if not hasattr(source, "read"):
        source = check_regular_file(source, record)
    with warnings.catch_warnings():  # sizes between Pillow's warning and ours: our limit decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(source)
        except Image.DecompressionBombError as exc:
            raise InputError(f"image is over the pixel limit ({_problem(exc)})", path=path, record=record) from None
        except Exception as exc:
            raise InputError(f"unreadable image ({_problem(exc)})", path=path, record=record) from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise InputError(f"image of {width}x{height} pixels is over the limit of {max_pixels:,} pixels "
                             "(a decompression bomb, or an image too large to process)", path=path, record=record)
        yield img


def decode_rgb(img, *, path: str | Path, record: Any = None):
    """An image from `open_image` -> a decoded, upright 8-bit RGB Pillow image (see the module doc)."""
    from PIL import Image

    try:
        orientation = _orientation(img)
        if img.mode in _SIXTEEN_BIT_GRAY:
            img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
        transpose = _ORIENTATION_TRANSPOSE.get(orientation)
        if transpose is not None:
            img = img.transpose(getattr(Image.Transpose, transpose))
        return img.convert("RGB")
    except Exception as exc:  # decoding happens here: truncated data, a corrupt stream, ...
        raise InputError(f"unreadable image ({_problem(exc)})", path=path, record=record) from None


def image_size(path: str | Path, record: Any = None, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file as it is displayed and read (EXIF orientation applied),
    from its header only."""
    with open_image(path, record=record, max_pixels=max_pixels) as img:
        return displayed_size(img)


def open_rgb(path: str | Path, record: Any = None, max_pixels: int = MAX_PIXELS):
    """Decode an image file to an upright 8-bit RGB Pillow image."""
    with open_image(path, record=record, max_pixels=max_pixels) as img:
        return decode_rgb(img, path=path, record=record)


def load_image(path: str | Path, record: Any = None, max_pixels: int = MAX_PIXELS):
    """Decode an image file to a uint8 RGB tensor [3, H, W] (upright, see the module doc); a
    missing, unreadable, truncated or oversized file is an InputError naming it."""
    import torch

    array = np.asarray(open_rgb(path, record, max_pixels))
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
