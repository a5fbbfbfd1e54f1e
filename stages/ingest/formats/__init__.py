"""Dataset converters: one module per release format, each ``convert(spec) -> Converted``.

The format names are owned by ``pipeline.manifest.FORMATS`` (the manifest validates ``format:`` against it
before any stage runs): a new format is a module here named like its entry there, and nothing else.

A converter only parses annotations into :class:`Record` s (relative image paths, comments,
score). Problems it can see in the annotations go to ``Converted.quarantine``; image checks,
duplicate ids and empty comments are done once for all formats in ``stages.ingest.run``.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.manifest import FORMATS, DatasetSpec
from storage.image_files import IMAGE_EXTS
from storage.images import ImageError, safe_join

SPLITS = ("train", "validation", "test")


@dataclass
class Record:
    image_id: str
    split: str
    path: str  # relative to Converted.image_root, as the annotation gives it
    score: float | None = None
    comments: list[tuple[str, str | None]] = field(default_factory=list)  # (text, aspect)
    source: str = ""  # where it came from, for quarantine entries


@dataclass
class Rejection:
    source: str
    image_id: str | None
    reason: str
    detail: str


@dataclass
class Converted:
    image_root: Path  # absolute directory the record paths are relative to
    records: list[Record] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)  # annotation files read (fingerprinted)
    quarantine: list[Rejection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # shown to the user (e.g. a skipped split)

    def reject(self, source: str, image_id: str | None, reason: str, detail: str) -> None:
        self.quarantine.append(Rejection(source, image_id, reason, detail))


def converter(fmt: str) -> ModuleType:
    """The module converting ``fmt`` (it has ``VERSION`` and ``convert``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(FORMATS)}")
    return importlib.import_module(f"stages.ingest.formats.{fmt}")


def image_root(spec: DatasetSpec, default: str = "") -> Path:
    return (spec.root / (spec.image_dir if spec.image_dir is not None else default)).absolute()


def split_files(spec: DatasetSpec, defaults: dict[str, str], out: Converted) -> list[tuple[str, Path]]:
    """(split, annotation file) pairs that exist; absent ones are noted and skipped."""
    wanted = {k: v or defaults.get(k, "") for k, v in spec.splits.items()} if spec.splits else dict(defaults)
    found = []
    for split, name in wanted.items():
        path = spec.root / name if name else None
        if path is None or not path.is_file():
            out.notes.append(f"split {split}: {name or '(no file name)'} not found in {spec.root}, skipped")
            continue
        found.append((split, path))
    return found


def read_text(path: Path, out: Converted) -> str:
    """UTF-8 text (BOM allowed). Invalid bytes become U+FFFD, which run.py quarantines per comment."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        out.notes.append(f"{path.name}: invalid UTF-8 at byte {e.start}; affected texts are quarantined as non_utf8")
        return data.decode("utf-8-sig", errors="replace")


def read_json(path: Path, out: Converted, image_id: str | None = None) -> Any | None:
    """Parsed JSON, or None after quarantining an unparseable file."""
    try:
        return json.loads(read_text(path, out))
    except (OSError, ValueError) as e:
        out.reject(str(path), image_id, "bad_annotation", f"cannot parse {path.name}: {e}")
        return None


def as_score(value: Any) -> float | None:
    """A numeric score, or None for missing / "NA" / non-numeric values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return score if score == score and abs(score) != float("inf") else None


def with_extension(root: Path, rel: str, exts: tuple[str, ...] = IMAGE_EXTS) -> str:
    """``rel`` if that file exists, else the first ``rel + ext`` that does (else ``rel`` unchanged)."""
    try:
        if safe_join(root, rel).exists():
            return rel
    except ImageError:
        return rel  # run.py quarantines it with the reason
    for ext in exts:
        for candidate in (rel + ext, rel + ext.upper()):
            if (root / candidate).exists():
                return candidate
    return rel
