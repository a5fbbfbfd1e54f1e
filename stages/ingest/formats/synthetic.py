"""The embedded demo corpus (stages/synthetic): generated on demand by its generator, then read from
``annotations.jsonl``.

Each line: {"image_id", "split", "file", "score", "references": [...], "attributes", "mask"}. Option
``captions``: ``references`` (default: the five critiques) or ``description`` (one plain scene description
per image, what the demo base model is pretrained on).
"""
from __future__ import annotations

import json

from pipeline.manifest import DatasetSpec
from stages.ingest.formats import Converted, Record, as_score, read_text
from stages.synthetic.attributes import description

VERSION = 1
CREATES_ROOT = True  # the generator writes the corpus on first use


def convert(spec: DatasetSpec) -> Converted:
    if spec.options.get("generate", True):
        from stages.synthetic.corpus import generate_corpus

        generate_corpus(spec.root, int(spec.options.get("n", 240)), int(spec.options.get("seed", 0)))
    captions = spec.options.get("captions", "references")
    if captions not in ("references", "description"):
        raise ValueError(f"dataset option captions must be 'references' or 'description', got {captions!r}")
    out = Converted(image_root=spec.root.absolute())
    path = spec.root / "annotations.jsonl"
    if not path.is_file():
        out.notes.append(f"{path} not found, nothing to ingest")
        return out
    out.inputs.append(path)
    for n, line in enumerate(read_text(path, out).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{n}"
        try:
            rec = json.loads(line)
            refs = (rec.get("references") or []) if captions == "references" else [description(rec["attributes"])]
            record = Record(str(rec["image_id"]), str(rec["split"]), str(rec["file"]), as_score(rec.get("score")),
                            [(r if isinstance(r, str) else "", None) for r in refs], where)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            out.reject(where, None, "bad_record", f"cannot read line {n}: {e!r}")
            continue
        out.records.append(record)
    return out
