"""PCCD (GuruShots critiques, Aestheval release): ``guru_{split}.json`` + ``images/full/<title>``.

Each record holds seven aspect critiques; each non-empty one is a reference with its aspect.
An empty string means the reviewer skipped that aspect (its score is "N"/"NA"), so it is not a
comment. ``description`` is the photographer's own text and is never a reference.
"""
from __future__ import annotations

from pipeline.manifest import DatasetSpec
from stages.ingest.formats import Converted, Record, as_score, image_root, read_json, split_files, with_extension

VERSION = 1
ASPECTS = (
    "general_impression", "subject_of_photo", "composition", "use_of_camera",
    "depth_of_field", "color_lighting", "focus",
)
DEFAULT_SPLITS = {s: f"guru_{s}.json" for s in ("train", "validation", "test")}


def convert(spec: DatasetSpec) -> Converted:
    out = Converted(image_root=image_root(spec, "images/full"))
    for split, path in split_files(spec, DEFAULT_SPLITS, out):
        out.inputs.append(path)
        data = read_json(path, out)
        if data is None:
            continue
        if not isinstance(data, list):
            out.reject(str(path), None, "bad_annotation", f"expected a JSON list of records, got {type(data).__name__}")
            continue
        for i, rec in enumerate(data):
            source = f"{path.name}[{i}]"
            title = rec.get("title") if isinstance(rec, dict) else None
            if not isinstance(title, str) or not title.strip():
                out.reject(source, None, "bad_record", "record has no string `title` (the image name)")
                continue
            comments = []
            for aspect in ASPECTS:
                text = rec.get(aspect)
                if text is None or text == "":
                    continue
                if not isinstance(text, str):
                    out.reject(source, title, "bad_record", f"`{aspect}` is {type(text).__name__}, not text")
                    continue
                comments.append((text, aspect))
            out.records.append(Record(
                image_id=title, split=split, path=with_extension(out.image_root, title),
                score=as_score(rec.get("overall")), comments=comments, source=source,
            ))
    return out
