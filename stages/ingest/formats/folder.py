"""Any directory of photos (recursive): how users critique their own pictures.

Image id = path relative to the root. An optional sidecar ``<stem>.txt`` beside a photo holds
references, one per non-empty line. Every image is in split "test".
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.manifest import DatasetSpec
from stages.ingest.formats import IMAGE_EXTS, Converted, Record, image_root, read_text

VERSION = 1


def convert(spec: DatasetSpec) -> Converted:
    out = Converted(image_root=image_root(spec))
    exts = {"." + e.lower().lstrip(".") for e in spec.options.get("extensions", IMAGE_EXTS)}  # "JPG" -> ".jpg"
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(out.image_root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            if path.suffix.lower() not in exts:
                ignored += path.suffix.lower() != ".txt"  # sidecars are read with their photo
                continue
            rel = path.relative_to(out.image_root).as_posix()
            comments: list[tuple[str, str | None]] = []
            sidecar = path.with_suffix(".txt")
            if sidecar.is_file():
                out.inputs.append(sidecar)
                comments = [(line, None) for line in read_text(sidecar, out).splitlines() if line.strip()]
            out.records.append(Record(rel, "test", rel, None, comments, rel))
    if ignored:
        out.notes.append(f"ignored {ignored} file(s) without an image extension ({', '.join(sorted(exts))})")
    return out
