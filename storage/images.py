"""The one place that opens image files: every stage reads pixels through :func:`open_rgb`.

Anything that cannot be decoded becomes an :class:`ImageError` with a short reason code
(quarantine-friendly) instead of a PIL exception: missing, zero-byte, non-image, truncated
or corrupt files, and decompression bombs (more pixels than ``max_pixels``).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 120_000_000  # a 102 MP medium-format frame passes; bombs claiming more do not
# PIL's own bomb check warns at 89 MP and raises at 179 MP; we enforce ``max_pixels`` ourselves
# right after reading the header (before any decoding), so a bomb is an ImageError, never a crash.
Image.MAX_IMAGE_PIXELS = None

_ORIENTATION = 0x0112  # EXIF tag; values 5..8 swap width and height
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class ImageError(Exception):
    """An image that cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF rotation
    height: int
    sha256: str  # of the file's bytes


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel`` for a relative path that stays lexically inside ``root`` (symlinks are trusted)."""
    if not rel or "\x00" in rel:
        raise ImageError("path_escapes_root", f"invalid relative path {rel!r}")
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or rel.startswith(("/", "\\")):
        raise ImageError("path_escapes_root", f"absolute path {rel!r} (must be relative to {root})")
    if ".." in posix.parts or ".." in windows.parts:
        raise ImageError("path_escapes_root", f"path {rel!r} leaves the dataset root {root}")
    return Path(root) / posix


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError("missing_image", f"{path} does not exist") from None
    except OSError as e:
        raise ImageError("unreadable_image", f"{path}: {e.strerror or e}") from None
    if not path.is_file():
        raise ImageError("not_a_file", f"{path} is not a regular file")
    if st.st_size == 0:
        raise ImageError("empty_file", f"{path} has zero bytes")


def _decode(fp: BinaryIO, name: str, max_pixels: int, fast: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """Open, bomb-check and fully decode; returns the image and its header size (w, h).

    ``fast`` lets JPEG decode at 1/8 scale (DCT scaling still reads every byte, so
    truncation is still detected) for validation, where only the header size matters.
    """
    try:
        img = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageError("not_an_image", f"{name}: not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageError("too_many_pixels", f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _decode_error(name, e) from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("corrupt_image", f"{name}: header says {w}x{h}")
    if w * h > max_pixels:
        raise ImageError("too_many_pixels", f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit {max_pixels:,}")
    if fast and img.format == "JPEG":
        img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError("too_many_pixels", f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise _decode_error(name, e) from None
    return img, (w, h)


def _decode_error(name: str, e: BaseException) -> ImageError:
    text = str(e) or type(e).__name__
    reason = "truncated_image" if "truncat" in text.lower() else "corrupt_image"
    return ImageError(reason, f"{name}: {text}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    if img.mode in _SIXTEEN_BIT:  # 16-bit greyscale: scale 0..65535 -> 0..255 (convert() would clip)
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":  # float greyscale: [0, 1] if it fits there, else already 0..255
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        img = Image.fromarray(np.clip(np.nan_to_num(np.rint(a)), 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def open_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` to an upright 8-bit RGB image (EXIF rotation applied)."""
    path = Path(path)
    _check_file(path)
    try:
        with open(path, "rb") as fh:
            img, _ = _decode(fh, str(path), max_pixels)
    except PermissionError as e:
        raise ImageError("unreadable_image", f"{path}: {e.strerror or e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF: keep the stored orientation rather than reject the pixels
        pass
    return _to_rgb(img)


def inspect_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Verify that ``path`` decodes completely; return its upright size and byte hash (one read)."""
    path = Path(path)
    _check_file(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError("unreadable_image", f"{path}: {e.strerror or e}") from None
    img, (w, h) = _decode(io.BytesIO(data), str(path), max_pixels, fast=True)
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # malformed EXIF: same policy as open_rgb (no rotation)
        orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return ImageInfo(width=w, height=h, sha256=hashlib.sha256(data).hexdigest())
