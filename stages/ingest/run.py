"""Ingest one dataset: manifest spec -> converter -> image checks -> canonical tables.

Incremental: the fingerprint covers the format, converter versions, options, annotation
files and image files (size + mtime); when it equals ``meta.json``'s nothing is redone.
Atomic: the three Parquet tables are all written to temp files before any replaces its
predecessor, and ``meta.json`` is written last, so its fingerprint matches only a complete,
consistent set of tables and a kill while writing leaves the previous set intact.

Comments longer than the dataset's ``max_comment_chars`` (default :data:`MAX_COMMENT_CHARS`) are cut
there, at a word boundary where one is near; the full text goes to the quarantine table
(``comment_too_long``), so no later stage meets an unbounded string.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.manifest import DatasetSpec
from pipeline.paths import dataset_dir
from stages.ingest.formats import SPLITS, Converted, Rejection, converter
from stages.ingest.validate import MAX_ASPECT_RATIO, check_images, file_stat
from storage.atomic import atomic_path, write_json_atomic
from storage.image_files import printable
from storage.images import DEFAULT_MAX_PIXELS
from storage.tables import COMMENTS_SCHEMA, IMAGES_SCHEMA, QUARANTINE_SCHEMA, TABLES, read_meta

INGEST_VERSION = 2
# Reddit caps a comment at 10,000 characters, so no RPCD critique is longer, and PCCD, DPC2022 and
# AVA-Captions comments are far shorter: the default cuts only broken or hostile input (e.g. a 1 MB
# one-line sidecar) while keeping every real critique whole. ~2,500 tokens: within the tokeniser's
# 4,096 and what METEOR / SPICE handle per sentence.
MAX_COMMENT_CHARS = 10_000


class IngestError(PipelineError):
    """A dataset that cannot be ingested at all (e.g. its root does not exist)."""


@dataclass(frozen=True)
class IngestResult:
    dataset: str
    up_to_date: bool
    counts: dict[str, Any]
    summary: str


def fingerprint(spec: DatasetSpec, conv: Converted, version: int, max_pixels: int) -> str:
    """Hash of everything the tables depend on; file contents are represented by size + mtime."""
    h = hashlib.sha256()
    settings = {
        "format": spec.format, "versions": [INGEST_VERSION, version], "options": spec.options,
        "splits": spec.splits, "image_root": str(conv.image_root),
        "max_pixels": max_pixels, "max_aspect_ratio": MAX_ASPECT_RATIO,
        "allow_external_links": spec.allow_external_links, "max_comment_chars": comment_cap(spec),
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode("utf-8", "surrogateescape"))
    for path in sorted(conv.inputs):
        st = path.stat()
        h.update(f"\nA {path}\t{st.st_size}\t{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    for rel in sorted({r.path for r in conv.records}):  # paths are OS bytes: hash them as such, never fail
        h.update(f"\nI {rel}\t{file_stat(conv.image_root, rel)}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def comment_cap(spec: DatasetSpec) -> int:
    return spec.max_comment_chars or MAX_COMMENT_CHARS


def cut_comment(text: str, cap: int) -> str:
    """``text`` cut to at most ``cap`` characters, at the last whitespace when it lies in the second half."""
    if len(text) <= cap:
        return text
    head = text[:cap + 1]  # one more: a cut right before a space is a word boundary too
    space = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return (head[:space] if space > cap // 2 else text[:cap]).rstrip()


def input_fingerprint(spec: DatasetSpec, module: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """Fingerprint of the dataset's inputs as they are now (what ``meta.json`` is compared with)."""
    return fingerprint(spec, module.convert(spec), module.VERSION, max_pixels)


def _read_meta(dataset: str) -> dict[str, Any] | None:
    """The last ingest's ``meta.json``, or None when absent or unreadable (then everything is redone)."""
    try:
        return read_meta(dataset)
    except (OSError, ValueError):
        return None


def _build(
    spec: DatasetSpec, conv: Converted, cache_path: Path, max_pixels: int, workers: int,
) -> tuple[list, list, list[Rejection]]:
    """Rows of images / comments, and every rejection (the converter's and ours)."""
    rejected = list(conv.quarantine)
    first_seen: dict[str, str] = {}
    records = []
    for r in conv.records:
        if r.image_id in first_seen:
            rejected.append(Rejection(r.source, r.image_id, "duplicate_id",
                                      f"id '{r.image_id}' already defined by {first_seen[r.image_id]}; kept the first"))
            continue
        first_seen[r.image_id] = r.source
        records.append(r)
    checked = check_images(conv.image_root, sorted({r.path for r in records}), cache_path, max_pixels, workers,
                           spec.allow_external_links)
    cap = comment_cap(spec)
    images, comments = [], []
    for r in records:
        c = checked[r.path]
        if c.info is None:
            rejected.append(Rejection(r.path, r.image_id, c.reason or "bad_image", c.detail or ""))
            continue
        images.append({"image_id": r.image_id, "split": r.split, "path": r.path, "width": c.info.width,
                       "height": c.info.height, "sha256": c.info.sha256, "score": r.score})
        k = 0
        for text, aspect in r.comments:
            what = f"{aspect or 'comment'} of {r.source or r.image_id}"
            if not text.strip():
                rejected.append(Rejection(r.source, r.image_id, "empty_comment", f"{what} is empty or whitespace only"))
            elif "\ufffd" in text:
                rejected.append(Rejection(r.source, r.image_id, "non_utf8",
                                          f"{what} holds bytes that are not valid UTF-8: {text[:80]!r}"))
            else:
                text = text.strip()
                if len(text) > cap:
                    rejected.append(Rejection(r.source, r.image_id, "comment_too_long", text))
                    text = cut_comment(text, cap)
                comments.append({"image_id": r.image_id, "comment_id": f"{r.image_id}#{k}",
                                 "text": text, "aspect": aspect})
                k += 1
    return images, comments, rejected


def _write_tables(out: Path, tables: dict[str, pa.Table]) -> None:
    """Write every table to a temp file first, then rename them all: a failure or kill while
    writing leaves the previous tables untouched."""
    with ExitStack() as stack:
        for name, table in tables.items():
            pq.write_table(table, stack.enter_context(atomic_path(out / f"{name}.parquet")))


def _summary(name: str, counts: dict[str, Any], seconds: float) -> str:
    splits = counts["splits"]
    shown = list(SPLITS) + sorted(s for s in splits if s not in SPLITS)
    split_text = ", ".join(f"{s} {splits.get(s, 0):,}" for s in shown)
    reasons = counts["reasons"]
    why = f" ({', '.join(f'{r} {n:,}' for r, n in reasons.items())})" if reasons else ""
    bare = counts["images_without_comments"]
    notes = [f"{bare:,} images without comments"] if bare else []
    if counts["comments_cut"]:
        notes.append(f"{counts['comments_cut']:,} cut to {counts['max_comment_chars']:,} characters, "
                     "full text in quarantine")
    note_text = f" ({'; '.join(notes)})" if notes else ""
    return (f"ingest {name}: {counts['images']:,} images ({split_text}), {counts['comments']:,} comments{note_text}, "
            f"{counts['quarantined']:,} quarantined{why} in {seconds:.1f} s")


def ingest_dataset(
    spec: DatasetSpec, force: bool = False, workers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS,
    echo: Callable[[str], None] = print,
) -> IngestResult:
    """Convert, check and write one dataset's tables (or do nothing when up to date)."""
    t0 = time.perf_counter()
    module = converter(spec.format)
    if not getattr(module, "CREATES_ROOT", False) and not spec.root.is_dir():
        raise IngestError(f"dataset '{spec.name}': root {spec.root} is not a directory "
                          f"(fix `datasets.{spec.name}.root` in the manifest)")
    conv: Converted = module.convert(spec)
    for note in conv.notes:
        echo(f"ingest {spec.name}: {printable(note)}")
    fp = fingerprint(spec, conv, module.VERSION, max_pixels)
    out = dataset_dir(spec.name)
    meta = _read_meta(spec.name)
    complete = all((out / f"{t}.parquet").exists() for t in TABLES)
    if not force and complete and meta is not None and meta.get("fingerprint") == fp:
        c = meta["counts"]
        summary = (f"ingest {spec.name}: up to date ({c['images']:,} images, {c['comments']:,} comments, "
                   f"{c['quarantined']:,} quarantined)")
        echo(summary)
        return IngestResult(spec.name, True, c, summary)

    images, comments, rejected = _build(spec, conv, out / "image_cache.parquet", max_pixels, workers)
    quarantine = [{"source": printable(q.source), "image_id": q.image_id and printable(q.image_id), "reason": q.reason,
                   "detail": printable(q.detail)} for q in rejected]
    _write_tables(out, {
        "images": pa.Table.from_pylist(images, schema=IMAGES_SCHEMA),
        "comments": pa.Table.from_pylist(comments, schema=COMMENTS_SCHEMA),
        "quarantine": pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA),
    })
    with_comments = {c["image_id"] for c in comments}
    counts = {
        "images": len(images), "comments": len(comments), "quarantined": len(quarantine),
        "splits": dict(Counter(i["split"] for i in images)),
        "reasons": dict(Counter(q["reason"] for q in quarantine).most_common()),
        "images_without_comments": sum(1 for i in images if i["image_id"] not in with_comments),
        "comments_cut": sum(1 for q in quarantine if q["reason"] == "comment_too_long"),
        "max_comment_chars": comment_cap(spec),
    }
    write_json_atomic(out / "meta.json", {
        "dataset": spec.name, "format": spec.format, "root": str(conv.image_root), "fingerprint": fp,
        "counts": counts, "source": spec.source, "licence": spec.licence,
    })
    for split, n in spec.expected.items():
        got = counts["splits"].get(split, 0)
        if got != n:
            echo(f"ingest {spec.name}: split {split} has {got:,} images, the manifest expects {n:,}")
    summary = _summary(spec.name, counts, time.perf_counter() - t0)
    echo(summary)
    return IngestResult(spec.name, False, counts, summary)
