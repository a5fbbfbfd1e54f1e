"""What the generator drew, read back for an ingested synthetic dataset: the ground truth that training on true
masks (``--saliency truth``) and the report's attribute scores use."""
from __future__ import annotations

import json
from pathlib import Path

from storage.tables import read_meta


def ground_truth(dataset: str) -> dict[str, dict] | None:
    """image_id -> {"attributes", "score", "mask" (absolute path), "subjects" (each subject's attributes),
    "aesthetic" (the aesthetic subject's index), "subject_labels" (absolute path of the label map), "scene" (what
    was drawn: ``corpus.render``)} of an ingested synthetic dataset, else None.

    The generator knows what it drew; real datasets have no such truth (None).
    """
    meta = read_meta(dataset)
    root = Path(meta["root"])
    path = root / "annotations.jsonl"
    if meta.get("format") != "synthetic" or not path.is_file():
        return None
    truth = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            truth[str(rec["image_id"])] = {"attributes": rec["attributes"], "score": rec["score"],
                                           "mask": str(root / rec["mask"]), "subjects": rec["subjects"],
                                           "aesthetic": rec["aesthetic"],
                                           "subject_labels": str(root / rec["subject_labels"]), "scene": rec.get("scene")}
    return truth


def moved_subject(entry: dict) -> int:
    """The subject a moved mask marks instead of the aesthetic one: the next in the annotation's order."""
    return (entry["aesthetic"] + 1) % len(entry["subjects"])
