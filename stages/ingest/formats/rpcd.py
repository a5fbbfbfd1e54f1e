"""RPCD (Reddit Photo Critique Dataset, Aestheval release).

Per split either ``processed_{split}.json`` (records with ``im_id``, ``im_paths``,
``first_level_comments_values``, ``mean_score``), or the raw release: one
``reddit_photocritique_image_comments.json`` (``im_paths`` + ``first_level_comments_values``,
as columns or records) filtered by ``{split}_ids.csv`` (one post id per line, no header).
Image paths are relative to ``root`` (or ``image_dir``).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pipeline.manifest import DatasetSpec
from stages.ingest.formats import SPLITS, Converted, Record, as_score, image_root, read_json, read_text

VERSION = 1
RAW_COMMENTS = "reddit_photocritique_image_comments.json"


def post_id(value: str) -> str:
    """Post id from an id or an image name (``submission_<id>-image.jpg`` / ``<id>-image.jpg``)."""
    name = Path(value.strip()).name
    return name.removeprefix("submission_").split("-")[0].split(".")[0]


def _records(data: Any) -> list[dict] | None:
    """Rows from a list of records or a dict of equal-length columns (pandas ``to_dict('list')``)."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("im_paths"), list):
        n = len(data["im_paths"])
        cols = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == n}
        return [{k: v[i] for k, v in cols.items()} for i in range(n)]
    return None


def _append(out: Converted, split: str, rows: list, source: str, keep: set[str] | None) -> None:
    for i, rec in enumerate(rows):
        where = f"{source}[{i}]"
        rel = rec.get("im_paths") if isinstance(rec, dict) else None
        if isinstance(rel, list):  # some dumps keep a one-element list
            rel = rel[0] if len(rel) == 1 else None
        if not isinstance(rel, str) or not rel.strip():
            out.reject(where, None, "bad_record", "record has no image path (`im_paths`)")
            continue
        image_id = str(rec.get("im_id") or post_id(rel))
        if keep is not None and image_id not in keep:
            continue
        texts = rec.get("first_level_comments_values") or []
        if not isinstance(texts, list):
            out.reject(where, image_id, "bad_record", "`first_level_comments_values` is not a list")
            continue
        comments = []
        for t in texts:
            if isinstance(t, str):
                comments.append((t, None))
            else:
                out.reject(where, image_id, "bad_record", f"comment is {type(t).__name__}, not text")
        out.records.append(Record(image_id, split, rel, as_score(rec.get("mean_score")), comments, where))


def _read_ids(path: Path, out: Converted) -> set[str]:
    rows = csv.reader(read_text(path, out).splitlines())
    return {post_id(row[0]) for row in rows if row and row[0].strip() and row[0].strip() != "im_paths"}


def convert(spec: DatasetSpec) -> Converted:
    out = Converted(image_root=image_root(spec))
    raw_rows: list | None = None
    splits = spec.splits or {s: "" for s in SPLITS}
    for split, name in splits.items():
        candidates = [name] if name else [f"processed_{split}.json", f"processed_info_{split}.json", f"{split}_ids.csv"]
        path = next((spec.root / c for c in candidates if (spec.root / c).is_file()), None)
        if path is None:
            out.notes.append(f"split {split}: {' / '.join(candidates)} not found in {spec.root}, skipped")
            continue
        out.inputs.append(path)
        if path.suffix != ".csv":
            data = read_json(path, out)  # None: already quarantined as unparseable
            rows = _records(data)
            if rows is not None:
                _append(out, split, rows, path.name, None)
            elif data is not None:
                out.reject(str(path), None, "bad_annotation", f"{path.name} is not a list of records")
            continue
        raw_path = spec.root / spec.options.get("comments_file", RAW_COMMENTS)
        if not raw_path.is_file():
            out.notes.append(f"split {split}: {path.name} needs {raw_path.name}, which is missing; skipped")
            continue
        if raw_rows is None:
            out.inputs.append(raw_path)
            raw_rows = _records(read_json(raw_path, out)) or []
        _append(out, split, raw_rows, raw_path.name, _read_ids(path, out))
    return out
