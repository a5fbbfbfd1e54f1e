"""Shared test fixtures: an isolated work dir per test and the read-only ../shared oracles."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding slow tests run first: `make test`'s two workers each take whole files, and a long file
    left for last would keep one of them busy alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(autouse=True)
def isolated_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes its artefacts under its own ASE_WORK."""
    work = tmp_path / "work"
    monkeypatch.setenv("ASE_WORK", str(work))
    return work


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout; tests that need it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"oracle data not found at {SHARED} (the read-only ../shared beside the checkout)")
    return SHARED
