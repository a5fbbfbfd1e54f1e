"""Process-wide CLI state: which manifest the user chose (``--manifest``)."""
from __future__ import annotations

from pathlib import Path

from pipeline.manifest import Manifest, load_manifest

_manifest_path = Path("data_manifest.yaml")
_manifest: Manifest | None = None


def set_manifest_path(path: Path) -> None:
    global _manifest_path, _manifest
    _manifest_path, _manifest = Path(path), None


def manifest() -> Manifest:
    """The loaded manifest (loaded once, on first use)."""
    global _manifest
    if _manifest is None:
        _manifest = load_manifest(_manifest_path)
    return _manifest
