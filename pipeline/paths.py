"""Where everything lives under the work dir (``ASE_WORK``, default ``work/``)."""
from __future__ import annotations

import os
from pathlib import Path


def work_dir() -> Path:
    """Root of all generated artefacts; ``ASE_WORK`` overrides ``work/``."""
    return Path(os.environ.get("ASE_WORK", "work"))


def dataset_dir(dataset: str) -> Path:
    """Canonical tables of one ingested dataset (images / comments / quarantine)."""
    return work_dir() / "datasets" / dataset


def saliency_root() -> Path:
    """Saliency stores, one Zarr group per EAT fingerprint."""
    return work_dir() / "saliency"


def models_dir() -> Path:
    """Models trained by the pipeline itself (e.g. the demo's tiny EAT)."""
    return work_dir() / "models"


def runs_dir(dataset: str) -> Path:
    """Fine-tuning runs: ``runs/<dataset>/<name>/``."""
    return work_dir() / "runs" / dataset


def reports_dir(dataset: str) -> Path:
    """Reports: ``reports/<dataset>/<run>/``."""
    return work_dir() / "reports" / dataset


def study_dir(dataset: str) -> Path:
    """The dataset's ablation study: ``reports/<dataset>/study/`` (read by every report of the dataset)."""
    return reports_dir(dataset) / "study"
