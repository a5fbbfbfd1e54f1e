"""The embedded demo corpus: generated on demand, then read from ``annotations.jsonl``.

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


def ground_truth(dataset: str) -> dict[str, dict] | None:
    """image_id -> {"attributes", "score", "mask" (absolute path)} of an ingested synthetic dataset, else None.

    The generator knows what it drew; real datasets have no such truth (None).
    """
    from pathlib import Path

    from storage.tables import read_meta

    meta = read_meta(dataset)
    path = Path(meta["root"]) / "annotations.jsonl"
    if meta.get("format") != "synthetic" or not path.is_file():
        return None
    truth = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            truth[str(rec["image_id"])] = {"attributes": rec["attributes"], "score": rec["score"],
                                           "mask": str(Path(meta["root"]) / rec["mask"])}
    return truth
