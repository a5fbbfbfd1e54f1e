"""Which files of a folder are images, paths safe to print, and where a path really points.

One rule for ``ingest`` (folder datasets) and ``caption DIR``: :func:`find_images`. File names are
bytes on POSIX; Python hands undecodable bytes over as lone surrogates, which cannot be hashed,
printed or stored as UTF-8, so such names are reported (escaped by :func:`printable`), never used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def printable(text: str) -> str:
    """``text`` with bytes that are not valid UTF-8 (surrogate-escaped by the OS) as ``\\xNN``: safe to print,
    hash and store; unchanged for valid text."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that do not stand for bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_utf8(text: str) -> bool:
    """Whether ``text`` (e.g. a file name from the OS) is valid UTF-8 text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class ImageFiles:
    images: list[str] = field(default_factory=list)  # relative POSIX paths with an image suffix, sorted
    bad_names: list[str] = field(default_factory=list)  # image paths that are not valid UTF-8, escaped (printable)
    others: list[str] = field(default_factory=list)  # visible files without an image suffix (escaped)


def find_images(root: Path, extensions: tuple[str, ...] | list[str] = IMAGE_EXTS) -> ImageFiles:
    """The image files under ``root``, recursively, in sorted order.

    Names starting with "." (hidden files and folders) are skipped; symbolic links to folders are not
    descended; a file counts as an image when its suffix is in ``extensions`` (any case, dot optional)."""
    exts = {"." + e.lower().lstrip(".") for e in extensions}  # "JPG" -> ".jpg"
    found = ImageFiles()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if Path(name).suffix.lower() not in exts:
                found.others.append(printable(rel))
            elif is_utf8(rel):
                found.images.append(rel)
            else:
                found.bad_names.append(printable(rel))
    return found


class RootGuard:
    """Where paths under ``root`` really point, to keep symbolic links from leaving the root.

    Only metadata is read (lstat, readlink), never a file's content; folder resolutions are cached,
    so a check costs one lstat per file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._dirs: dict[Path, Path] = {}

    def outside(self, path: Path) -> Path | None:
        """The real target of ``path`` when it lies outside the root (a link out of it), else None."""
        parent = self._dirs.get(path.parent)
        if parent is None:
            parent = self._dirs[path.parent] = path.parent.resolve()
        target = parent / path.name
        if target.is_symlink():
            target = target.resolve()
        return None if target.is_relative_to(self.root) else target
