"""The embedded demo corpus: generated on demand, then read from ``annotations.jsonl``.

Each line: {"image_id", "split", "file", "score", "references": [...], "attributes", "mask"}.
"""
from __future__ import annotations

import json

from pipeline.manifest import DatasetSpec
from stages.ingest.formats import Converted, Record, as_score, read_text

VERSION = 1
CREATES_ROOT = True  # the generator writes the corpus on first use


def convert(spec: DatasetSpec) -> Converted:
    if spec.options.get("generate", True):
        from stages.ingest.synthetic_corpus import generate_corpus

        generate_corpus(spec.root, int(spec.options.get("n", 240)), int(spec.options.get("seed", 0)))
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
            refs = rec.get("references") or []
            record = Record(str(rec["image_id"]), str(rec["split"]), str(rec["file"]), as_score(rec.get("score")),
                            [(r if isinstance(r, str) else "", None) for r in refs], where)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            out.reject(where, None, "bad_record", f"cannot read line {n}: {e!r}")
            continue
        out.records.append(record)
    return out
