"""Where the demo's shipped starting weights live (package data) and their sidecars."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from storage.atomic import write_json_atomic

_PACKAGE = Path(__file__).resolve().parents[1]
SHIPPED_EAT = _PACKAGE / "saliency" / "data" / "eat_small_demo.safetensors"  # EAT-small, official key layout
SHIPPED_BASE = _PACKAGE / "finetune" / "data" / "demo_base"  # a plain InternVL -hf directory + tokenizer


def sidecar_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def write_sidecar(weights: Path, info: dict[str, Any], path: Path | None = None) -> None:
    """The weights' provenance next to them: ``info`` plus the weights' sha256."""
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    write_json_atomic(path or sidecar_path(weights), {**info, "sha256": digest})


def require(path: Path, what: str) -> Path:
    """``path`` if it exists, else a clear error naming the command that builds it."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} not found at {path}: rebuild it with `ase-mllm pretrain-demo` "
                                "(or restore it with `git checkout`)")
    return Path(path)
