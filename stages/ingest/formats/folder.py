"""Any directory of photos (recursive): how users critique their own pictures.

Image id = path relative to the root. Which files count is :func:`storage.image_files.find_images`
(the rule ``caption DIR`` uses too); a photo whose name is not valid UTF-8 is quarantined
(``bad_filename``). An optional sidecar ``<stem>.txt`` beside a photo holds references, one per
non-empty line; a sidecar that links outside the root is not read (``outside_root``) unless the
dataset allows external links. Every image is in split "test".
"""
from __future__ import annotations

from pathlib import Path

from pipeline.manifest import DatasetSpec
from stages.ingest.formats import IMAGE_EXTS, Converted, Record, image_root, read_text
from storage.image_files import RootGuard, find_images

VERSION = 2


def convert(spec: DatasetSpec) -> Converted:
    out = Converted(image_root=image_root(spec))
    found = find_images(out.image_root, spec.options.get("extensions", IMAGE_EXTS))
    guard = RootGuard(out.image_root)
    for bad in found.bad_names:
        out.reject(bad, None, "bad_filename",
                   f"{bad}: the file name is not valid UTF-8 (rename it, e.g. `convmv -f latin1 -t utf8 --notest`)")
    for rel in found.images:
        comments: list[tuple[str, str | None]] = []
        sidecar = (out.image_root / rel).with_suffix(".txt")
        if sidecar.is_file():
            target = None if spec.allow_external_links else guard.outside(sidecar)
            if target is not None:
                out.reject(rel, rel, "outside_root", f"sidecar {Path(rel).with_suffix('.txt').as_posix()} links to "
                           f"{target}, outside the dataset root (not read; set allow_external_links: true to follow it)")
            else:
                out.inputs.append(sidecar)
                comments = [(line, None) for line in read_text(sidecar, out).splitlines() if line.strip()]
        out.records.append(Record(rel, "test", rel, None, comments, rel))
    ignored = sum(1 for rel in found.others if not rel.lower().endswith(".txt"))  # sidecars are read with their photo
    if ignored:
        exts = ", ".join(sorted({"." + e.lower().lstrip(".") for e in spec.options.get("extensions", IMAGE_EXTS)}))
        out.notes.append(f"ignored {ignored} file(s) without an image extension ({exts})")
    return out
