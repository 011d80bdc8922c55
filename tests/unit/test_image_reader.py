"""The one image reader (`slsd_cli.data.images`, issues 21.3 and 24): EXIF orientation, modes
converted as the reference reads them (16-bit gray by its high byte), regular files only, the
pixel limit and truncated files as one-line errors; every reader of images goes through it."""

from __future__ import annotations

import io
import os
import signal
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slsd_cli.data.images import MAX_PIXELS, check_regular_file, image_size, load_image
from slsd_cli.errors import InputError
from slsd_cli.inference.image_sources import collect_images, expand_glob
from tests.helpers.paths import REPO


def _picture(height: int = 24, width: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    return np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))  # blocks: survive JPEG well


def save_rotated_pair(folder: Path) -> tuple[Path, Path]:
    """A JPEG whose EXIF says orientation 6 (stored sideways, shown rotated 90° clockwise) and a
    PNG holding exactly the upright pixels a reader that honours EXIF must return."""
    stored = Image.fromarray(_picture())
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = folder / "phone.jpg"
    stored.save(jpeg, quality=95, exif=exif.tobytes())
    with Image.open(jpeg) as img:  # the decoded stored pixels, turned as orientation 6 says
        upright = img.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    png = folder / "phone_upright.png"
    upright.save(png)
    return jpeg, png


def test_exif_orientation_is_applied_to_pixels_and_sizes(tmp_path):
    jpeg, png = save_rotated_pair(tmp_path)
    with Image.open(jpeg) as img:
        assert img.size == (40, 24)  # stored landscape
    image = load_image(jpeg)
    assert tuple(image.shape) == (3, 40, 24)  # shown portrait
    assert torch.equal(image, load_image(png))
    assert image_size(jpeg) == (24, 40) == image_size(png)
    # predict's image records carry the displayed size (what eval and the dataset check against)
    records = collect_images([str(jpeg), str(png)])
    assert {(r["width"], r["height"]) for r in records} == {(24, 40)}


def test_sixteen_bit_gray_reads_as_the_same_picture_in_8_bits(tmp_path):
    gray = _picture()[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "g8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # full-range 16 bits
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I;16")
        assert np.asarray(img.convert("RGB")).max() == 255 and np.asarray(img.convert("RGB")).mean() > 250  # clipped
    eight, sixteen = load_image(tmp_path / "g8.png"), load_image(tmp_path / "g16.png")
    assert torch.equal(eight, sixteen)
    assert torch.equal(eight[0], torch.from_numpy(gray)) and torch.equal(eight[0], eight[2])


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "CMYK", "1", "L"])
def test_other_modes_convert_as_the_reference_reads_them(tmp_path, mode):
    rgb = Image.fromarray(_picture())
    image = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    image.save(path)
    with Image.open(path) as img:
        expected = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(load_image(path), expected)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height but holds no pixel data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_pixel_limit_and_decompression_bomb_are_one_line_errors(tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 30000, 30000)
    for read in (load_image, image_size):
        with pytest.raises(InputError, match="pixel") as err:
            read(bomb)
        assert "\n" not in str(err.value) and str(bomb) in str(err.value)
    ours = tmp_path / "big.png"
    _png_header_only(ours, 12000, 12000)  # over our limit, under Pillow's own error
    assert 12000 * 12000 > MAX_PIXELS
    with pytest.raises(InputError, match=f"over the limit of {MAX_PIXELS:,} pixels"):
        image_size(ours)
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="20x20 pixels is over the limit of 100"):
        load_image(tmp_path / "small.png", max_pixels=100)


def test_truncated_and_unreadable_images_are_one_line_errors(tmp_path):
    data = io.BytesIO()
    Image.fromarray(_picture(64, 64)).save(data, format="PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(InputError, match="truncated") as err:
        load_image(cut, record="image id 7")
    assert "\n" not in str(err.value) and "image id 7" in str(err.value)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="not a recognised image format"):
        load_image(tmp_path / "text.png")
    with pytest.raises(InputError, match="image file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="a folder"):
        load_image(tmp_path)


@contextmanager
def fails_after(seconds: int):
    """Turn a hang into a test failure (SIGALRM)."""
    def hung(signum, frame):
        raise AssertionError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "list.json").write_text('["pipe.png"]')
    with fails_after(10):
        with pytest.raises(InputError, match="FIFO"):
            check_regular_file(fifo)
        with pytest.raises(InputError, match="FIFO"):
            load_image(fifo)
        with pytest.raises(InputError, match="FIFO"):
            collect_images([str(tmp_path / "list.json")])


def test_globs_walk_each_real_folder_once_and_keep_regular_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.png", "top.png", "a/.hidden.png"):
        Image.new("RGB", (4, 3)).save(tmp_path / name)
    os.symlink("..", tmp_path / "a" / "loop")  # a symlink loop
    os.symlink(".", tmp_path / "a" / "b" / "self")  # a second one
    os.mkfifo(tmp_path / "a" / "fifo.png")
    with fails_after(20):
        found = expand_glob(str(tmp_path / "**" / "*.png"))
        records = collect_images([str(tmp_path / "**" / "*.png")])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in found) == ["a/b/y.png", "a/x.png", "top.png"]
    assert len(records) == 3
    assert [p.name for p in expand_glob(str(tmp_path / "a" / "*.png"))] == ["x.png"]
    assert expand_glob(str(tmp_path / "a" / "b" / "y.png")) == [tmp_path / "a" / "b" / "y.png"]


@pytest.mark.parametrize("record, problem", [
    ({"id": 2 ** 63, "file_name": "x.png"}, "beyond the 64-bit integer range"),
    ({"id": True, "file_name": "x.png"}, "id must be an integer"),
    ({"id": 1, "file_name": ""}, "file_name must be a non-empty string"),
    ({"id": 1, "file_name": None}, "file_name must be a non-empty string"),
    ({"id": 1}, "file_name must be a non-empty string, got missing"),
    ({"file_name": "x.png"}, "missing required key 'id'"),
])
def test_image_list_records_are_checked(tmp_path, record, problem):
    Image.new("RGB", (4, 3)).save(tmp_path / "x.png")
    (tmp_path / "list.json").write_text(__import__("json").dumps({"images": [record]}))
    with pytest.raises(InputError, match=problem) as err:
        collect_images([str(tmp_path / "list.json")])
    assert "\n" not in str(err.value) and "images[0]" in str(err.value)


def test_every_image_reader_goes_through_the_one_module():
    """No module but the reader opens image files with Pillow (synth only writes them)."""
    opened = [path.relative_to(REPO).as_posix() for path in (REPO / "slsd_cli").rglob("*.py")
              if "Image.open(" in path.read_text() and path.name != "images.py"]
    assert opened == []
