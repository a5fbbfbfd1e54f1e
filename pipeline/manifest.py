"""Load and validate ``data_manifest.yaml``: datasets and model paths.

Every problem is raised as one :class:`ManifestError` naming the file, the key and the fix.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError

# Dataset formats: each names a converter module stages/ingest/formats/<format>.py (a test checks the two agree).
FORMATS = ("synthetic", "pccd", "rpcd", "dpc2022", "ava_captions", "folder")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^${}]*))?\}")  # innermost first


class ManifestError(PipelineError, ValueError):
    """A manifest that cannot be used; the message says where and how to fix it."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    format: str
    root: Path
    splits: dict[str, str] = field(default_factory=dict)  # split -> annotation file (format default if empty)
    image_dir: str | None = None
    expected: dict[str, int] = field(default_factory=dict)  # split -> expected image count
    options: dict[str, Any] = field(default_factory=dict)  # format-specific (e.g. synthetic n, seed)
    source: str = ""
    licence: str = ""
    allow_external_links: bool = False  # follow symbolic links that point outside `root` (else: quarantined)
    max_comment_chars: int | None = None  # longer comments are cut (None: ingest's default)


# EAT's only input size (the official model works at 224 x 224 alone): part of every saliency store's fingerprint.
EAT_INPUT_SIZE = 224


@dataclass(frozen=True)
class EatSpec:
    variant: str = "small"
    checkpoint: Path | None = None  # None: the pipeline-trained model under work/models
    target_layer: str = "stages.2"
    num_classes: int = 10


@dataclass(frozen=True)
class MllmSpec:
    base: Path | None = None  # local native transformers InternVL directory; None: build the tiny demo model


@dataclass(frozen=True)
class Manifest:
    path: Path
    datasets: dict[str, DatasetSpec]
    eat: EatSpec
    mllm: MllmSpec

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            known = ", ".join(sorted(self.datasets))
            raise ManifestError(f"{self.path}: no dataset named '{name}' (known: {known})")
        return self.datasets[name]


def expand_vars(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` from the environment; defaults may nest."""

    def sub(m: re.Match[str]) -> str:
        value = os.environ.get(m.group(1))
        if value:
            return value
        if m.group(2) is not None:
            return m.group(2)
        raise KeyError(m.group(1))

    while (expanded := _VAR.sub(sub, text)) != text:
        text = expanded
    return text


class _Reader:
    """Typed accessors that name the file and key on every error."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str, fix: str) -> ManifestError:
        return ManifestError(f"{self.path}: key '{key}': {problem}. Fix: {fix}")

    def mapping(self, obj: Any, key: str) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise self.fail(key, f"expected a mapping, got {type(obj).__name__}", "write it as `key: value` lines")
        return obj

    def string(self, obj: dict[str, Any], key: str, where: str, default: str | None = None) -> str | None:
        if key not in obj or obj[key] is None:
            return default
        value = obj[key]
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise self.fail(f"{where}.{key}", f"expected a string, got {type(value).__name__}", "give a plain string")
        try:
            return expand_vars(str(value))
        except KeyError as e:
            raise self.fail(
                f"{where}.{key}", f"environment variable {e.args[0]} is not set",
                f"export {e.args[0]}=... or write ${{{e.args[0]}:-default}}",
            ) from None

    def integer(self, obj: dict[str, Any], key: str, where: str, minimum: int | None = None) -> int | None:
        value = obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{where}.{key}", f"expected an integer, got {value!r}", "give a whole number")
        if minimum is not None and value < minimum:
            raise self.fail(f"{where}.{key}", f"{value} is below {minimum}", f"give a whole number >= {minimum}")
        return value

    def boolean(self, obj: dict[str, Any], key: str, where: str, default: bool = False) -> bool:
        value = obj.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(f"{where}.{key}", f"expected true/false, got {value!r}", "write true or false")
        return value

    def path_of(self, value: str | None) -> Path | None:
        if not value:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)


def _dataset(r: _Reader, name: str, raw: Any) -> DatasetSpec:
    where = f"datasets.{name}"
    raw = r.mapping(raw, where)
    fmt = r.string(raw, "format", where)
    if fmt is None:
        raise r.fail(f"{where}.format", "missing", f"add `format:` (one of {', '.join(FORMATS)})")
    if fmt not in FORMATS:
        raise r.fail(f"{where}.format", f"unknown format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    root = r.string(raw, "root", where)
    if root is None:
        raise r.fail(f"{where}.root", "missing", "add `root:` (the dataset's directory)")
    splits_raw = raw.get("splits") or {}
    splits = {str(k): r.string(r.mapping(splits_raw, f"{where}.splits"), k, f"{where}.splits") or "" for k in splits_raw}
    expected_raw = r.mapping(raw.get("expected") or {}, f"{where}.expected")
    expected = {str(k): r.integer(expected_raw, k, f"{where}.expected") or 0 for k in expected_raw}
    options = r.mapping(raw.get("options") or {}, f"{where}.options")
    return DatasetSpec(
        name=name,
        format=fmt,
        root=r.path_of(root) or Path(root),
        splits=splits,
        image_dir=r.string(raw, "image_dir", where),
        expected=expected,
        options=dict(options),
        source=r.string(raw, "source", where, "") or "",
        licence=r.string(raw, "licence", where, "") or "",
        allow_external_links=r.boolean(raw, "allow_external_links", where),
        max_comment_chars=r.integer(raw, "max_comment_chars", where, minimum=1),
    )


def load_manifest(path: str | Path) -> Manifest:
    """Parse, expand and validate a manifest file."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: file not found. Fix: pass --manifest PATH or run from the repository root")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ManifestError(f"{path}: invalid YAML{line}: {problem}. Fix: correct the YAML syntax there") from None
    r = _Reader(path)
    raw = r.mapping(raw, "<top level>")
    datasets_raw = r.mapping(raw.get("datasets") or {}, "datasets")
    datasets = {str(name): _dataset(r, str(name), spec) for name, spec in datasets_raw.items()}
    models = r.mapping(raw.get("models") or {}, "models")
    eat_raw = r.mapping(models.get("eat") or {}, "models.eat")
    num_classes = r.integer(eat_raw, "num_classes", "models.eat") or 10
    eat = EatSpec(
        variant=r.string(eat_raw, "variant", "models.eat", "small") or "small",
        checkpoint=r.path_of(r.string(eat_raw, "checkpoint", "models.eat")),
        target_layer=r.string(eat_raw, "target_layer", "models.eat", "stages.2") or "stages.2",
        num_classes=num_classes,
    )
    mllm_raw = r.mapping(models.get("mllm") or {}, "models.mllm")
    trust = r.boolean(mllm_raw, "trust_remote_code", "models.mllm")  # remote code never runs; false is accepted
    if trust:
        raise r.fail("models.mllm.trust_remote_code", "checkpoints' remote code is never run",
                     "convert an original InternVL2 checkpoint once with `ase-mllm convert-base SRC OUT_DIR`, "
                     "set models.mllm.base to OUT_DIR and delete this key")
    mllm = MllmSpec(base=r.path_of(r.string(mllm_raw, "base", "models.mllm")))
    return Manifest(path=path, datasets=datasets, eat=eat, mllm=mllm)
