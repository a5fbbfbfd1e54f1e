"""AVA-Captions (Karpathy-format JSON): ``images[]{filename, split, sentences[{raw}]}``.

One file holds every split (``val`` -> validation, ``restval`` -> train); the manifest's
``splits`` values name the file(s). Images are ``<image_dir>/<filepath>/<filename>``.
"""
from __future__ import annotations

from pathlib import PurePosixPath

from pipeline.manifest import DatasetSpec
from stages.ingest.formats import Converted, Record, image_root, read_json

VERSION = 1
DEFAULT_FILE = "CLEAN_AVA_FULL_AFTER_SUBJECTIVE_CLEANING.json"
SPLIT_NAMES = {"train": "train", "restval": "train", "val": "validation", "validation": "validation", "test": "test"}


def convert(spec: DatasetSpec) -> Converted:
    out = Converted(image_root=image_root(spec, "images"))
    names = sorted({v for v in spec.splits.values() if v}) or [spec.options.get("annotation", DEFAULT_FILE)]
    for name in names:
        path = spec.root / name
        if not path.is_file():
            out.notes.append(f"{name} not found in {spec.root}, skipped")
            continue
        out.inputs.append(path)
        data = read_json(path, out)
        if data is None:
            continue
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            out.reject(str(path), None, "bad_annotation", f"{name} has no `images` list (Karpathy format)")
            continue
        for i, img in enumerate(images):
            where = f"{name}[{i}]"
            filename = img.get("filename") if isinstance(img, dict) else None
            if not isinstance(filename, str) or not filename:
                out.reject(where, None, "bad_record", "image entry has no `filename`")
                continue
            split = SPLIT_NAMES.get(str(img.get("split")))
            if split is None:
                out.reject(where, filename, "bad_record", f"unknown split {img.get('split')!r}")
                continue
            rel = f"{img['filepath']}/{filename}" if img.get("filepath") else filename
            sentences = img.get("sentences") or []
            comments = [(s.get("raw") if isinstance(s, dict) and isinstance(s.get("raw"), str) else "", None)
                        for s in sentences]
            image_id = str(PurePosixPath(filename).with_suffix("")) if "." in filename else filename
            out.records.append(Record(image_id, split, rel, None, comments, where))
    return out
