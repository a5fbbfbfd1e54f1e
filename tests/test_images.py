"""storage/images.py: mode conversions, EXIF rotation and rejection codes, against known pixels."""
from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.ingest.validate import MAX_ASPECT_RATIO, check_image
from storage.images import ImageError, inspect_image, open_rgb, safe_join, sha256_file


def _reason(fn, *args) -> str:
    with pytest.raises(ImageError) as e:
        fn(*args)
    return e.value.reason


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    img = open_rgb(path)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert np.abs(np.asarray(img, dtype=int) - [255, 0, 0]).max() <= 3


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    a16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "g16.png"
    Image.fromarray(a16).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(open_rgb(path))
    assert rgb.shape == (4, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]  # v / 257: 16-bit white is 8-bit white
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_palette_with_transparency_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.paste(1, (2, 0, 4, 2))  # right half: colour index 1
    path = tmp_path / "p.png"
    img.save(path, transparency=0)  # index 0 (left half) transparent
    rgb = np.asarray(open_rgb(path))
    assert rgb[:, :2].tolist() == [[[255, 255, 255]] * 2] * 2
    assert rgb[:, 2:].tolist() == [[[10, 200, 30]] * 2] * 2


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 255, 255)  # opaque blue
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent red
    rgba[1, :] = (0, 0, 0, 102)  # 40 % black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(open_rgb(tmp_path / "a.png"), dtype=int)
    assert out[0, 0].tolist() == [0, 0, 255]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert np.abs(out[1] - round(255 * (1 - 102 / 255))).max() <= 1
    la = Image.fromarray(np.dstack([np.zeros((2, 2), np.uint8), np.full((2, 2), 0, np.uint8)]), "LA")
    la.save(tmp_path / "la.png")
    assert np.asarray(open_rgb(tmp_path / "la.png")).min() == 255


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # EXIF: rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = np.asarray(open_rgb(path), dtype=int)
    assert out.shape == (40, 20, 3)  # displayed portrait
    # clockwise: the stored left edge becomes the top
    assert np.abs(out[5, 10] - [255, 0, 0]).max() < 40 and np.abs(out[35, 10] - [0, 0, 255]).max() < 40
    info = inspect_image(path)
    assert (info.width, info.height) == (20, 40)


def test_rejections(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = tmp_path / "good.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all\n")
    for fn in (open_rgb, inspect_image):
        assert _reason(fn, tmp_path / "trunc.jpg") == "truncated_image"
        assert _reason(fn, tmp_path / "trunc.png") == "truncated_image"
        assert _reason(fn, tmp_path / "empty.jpg") == "empty_file"
        assert _reason(fn, tmp_path / "text.jpg") == "not_an_image"
        assert _reason(fn, tmp_path / "nope.jpg") == "missing_image"
        assert _reason(fn, tmp_path / "good.png", 64 * 64 - 1) == "too_many_pixels"
    assert inspect_image(good).sha256 == hashlib.sha256(data).hexdigest()


def test_decompression_bomb_is_an_image_error(tmp_path: Path) -> None:
    """A valid PNG whose header claims 100k x 100k pixels: rejected before decoding."""
    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    data = bytearray((tmp_path / "small.png").read_bytes())
    ihdr = 8  # IHDR chunk: length(4) type(4) width(4) height(4) ... crc(4)
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", 100_000, 100_000)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 8 + 13]))
    data[ihdr + 8 + 13:ihdr + 8 + 17] = struct.pack(">I", crc)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bytes(data))
    assert Image.open(bomb).size == (100_000, 100_000)
    assert _reason(open_rgb, bomb) == "too_many_pixels"
    assert _reason(inspect_image, bomb) == "too_many_pixels"


def test_safe_join(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/b.jpg") == tmp_path / "a" / "b.jpg"
    for bad in ("../x.jpg", "a/../../x.jpg", "/etc/passwd", "C:\\x.jpg", "\\\\server\\x.jpg", "..\\x.jpg", ""):
        assert _reason(safe_join, tmp_path, bad) == "path_escapes_root", bad


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    payload = np.random.default_rng(1).bytes(3_000_001)
    (tmp_path / "blob").write_bytes(payload)
    assert sha256_file(tmp_path / "blob", chunk=65536) == hashlib.sha256(payload).hexdigest()


def test_extreme_aspect_ratio(tmp_path: Path) -> None:
    limit = int(MAX_ASPECT_RATIO)
    Image.new("RGB", (10 * limit, 10)).save(tmp_path / "ok.png")
    Image.new("RGB", (10, 10 * limit + 10)).save(tmp_path / "tall.png")
    assert check_image(tmp_path, "ok.png").info is not None
    assert check_image(tmp_path, "tall.png").reason == "extreme_aspect_ratio"
    assert check_image(tmp_path, "../ok.png").reason == "path_escapes_root"
