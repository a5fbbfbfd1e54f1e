"""Canonical per-dataset tables (ingest's output, every later stage's input) and their Arrow schemas.

``work/datasets/<name>/`` holds ``images.parquet``, ``comments.parquet``,
``quarantine.parquet`` and ``meta.json`` (absolute image root, format, input fingerprint).
Image paths in ``images.parquet`` are relative to that root.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.paths import dataset_dir

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("path", pa.string()),  # relative to meta.json's root
        ("width", pa.int32()),  # after EXIF rotation
        ("height", pa.int32()),
        ("sha256", pa.string()),  # of the file's bytes
        ("score", pa.float64()),  # dataset's aesthetic score where it has one, else null
    ]
)
COMMENTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("comment_id", pa.string()),
        ("text", pa.string()),
        ("aspect", pa.string()),  # null where the dataset has no aspects
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # file or record that was rejected
        ("image_id", pa.string()),  # null when unknown
        ("reason", pa.string()),  # short machine-readable code, e.g. "truncated_image"
        ("detail", pa.string()),  # human-readable explanation
    ]
)
TABLES = {"images": IMAGES_SCHEMA, "comments": COMMENTS_SCHEMA, "quarantine": QUARANTINE_SCHEMA}


def table_path(dataset: str, name: str) -> Path:
    return dataset_dir(dataset) / f"{name}.parquet"


def ingested(datasets: Iterable[str]) -> list[str]:
    """The names among ``datasets`` that have been ingested (have an ``images.parquet``), sorted."""
    return sorted(n for n in datasets if table_path(n, "images").exists())


def read_table(dataset: str, name: str) -> pa.Table:
    """Read one canonical table; a clear error names the missing ingest step."""
    path = table_path(dataset, name)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run `ase-mllm ingest {dataset}` first"
        )
    return pq.read_table(path, schema=TABLES[name])


def read_meta(dataset: str) -> dict[str, Any]:
    path = dataset_dir(dataset) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `ase-mllm ingest {dataset}` first")
    return json.loads(path.read_text())


def image_root(dataset: str) -> Path:
    """Absolute directory that ``images.parquet`` paths are relative to."""
    return Path(read_meta(dataset)["root"])
