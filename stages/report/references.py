"""The reference critiques of a dataset's split, as every scorer reads them."""
from __future__ import annotations

from storage.tables import read_table


def references(dataset: str, split: str) -> dict[str, list[str]]:
    """image_id -> non-empty reference critiques of the split's images."""
    ids = {r["image_id"] for r in read_table(dataset, "images").select(["image_id", "split"]).to_pylist()
           if r["split"] == split}
    refs: dict[str, list[str]] = {}
    for row in read_table(dataset, "comments").select(["image_id", "text"]).to_pylist():
        if row["image_id"] in ids and row["text"] and row["text"].strip():
            refs.setdefault(row["image_id"], []).append(row["text"])
    return refs
