"""DPC2022 (ARIC release): one ``<ID>.json`` per image plus ARIC's split CSVs.

Split CSVs (``train.csv``, ``val.csv``, ``test.csv``) have an ``ID`` column (one row per
comment in ARIC's files, so ids repeat) or, without a header, ids in the first column.
Annotations live in ``options.annotation_dir`` (default ``clean_and_all_score``); references
are ``score_comments[].comment.comment`` (else ``clean_comments``); images ``<image_dir>/<ID>.jpg``.
"""
from __future__ import annotations

import csv
from pathlib import Path

from tqdm import tqdm

from pipeline.manifest import DatasetSpec
from stages.ingest.formats import Converted, Record, as_score, image_root, read_json, read_text, split_files

VERSION = 1
DEFAULT_SPLITS = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}


def _ids(path: Path, out: Converted) -> list[str]:
    rows = list(csv.reader(read_text(path, out).splitlines()))
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    col, body = (header.index("ID"), rows[1:]) if "ID" in header else (0, rows)
    seen: dict[str, None] = {}
    for row in body:
        if len(row) > col and row[col].strip():
            value = row[col].strip()
            seen[value.removesuffix(".0")] = None  # pandas may have written ids as floats
    return list(seen)


def _comments(ann: dict) -> list[tuple[str, str | None]]:
    scored = ann.get("score_comments")
    if isinstance(scored, list) and scored:
        inner = [c.get("comment") if isinstance(c, dict) else None for c in scored]
        texts = [c.get("comment") if isinstance(c, dict) else None for c in inner]
    else:
        texts = ann.get("clean_comments") or []
        if not isinstance(texts, list):
            texts = [texts]
    return [(t if isinstance(t, str) else "", None) for t in texts]


def convert(spec: DatasetSpec) -> Converted:
    out = Converted(image_root=image_root(spec, "images"))
    ann_dir = spec.root / spec.options.get("annotation_dir", "clean_and_all_score")
    for split, path in split_files(spec, DEFAULT_SPLITS, out):
        out.inputs.append(path)
        for image_id in tqdm(_ids(path, out), desc=f"dpc2022 {split}", unit="json", leave=False):
            if "/" in image_id or "\\" in image_id or image_id.startswith("."):
                out.reject(f"{path.name}:{image_id}", image_id, "path_escapes_root",
                           f"id {image_id!r} is not a file name")
                continue
            ann_path = ann_dir / f"{image_id}.json"
            if not ann_path.is_file():
                out.reject(str(ann_path), image_id, "missing_annotation", f"{ann_path} does not exist")
                continue
            out.inputs.append(ann_path)
            ann = read_json(ann_path, out, image_id)
            if not isinstance(ann, dict):
                if ann is not None:
                    out.reject(str(ann_path), image_id, "bad_annotation", "expected a JSON object")
                continue
            out.records.append(Record(
                image_id=image_id, split=split, path=f"{image_id}.jpg",
                score=as_score(ann.get("avg_all_users_score")), comments=_comments(ann), source=ann_path.name,
            ))
    return out
