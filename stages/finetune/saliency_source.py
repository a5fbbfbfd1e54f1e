"""Where each image's saliency map comes from, for training and generation alike.

- ``eat``: the saliency store of the manifest's EAT (stage 1), the pipeline's normal path
- ``uniform``: no map for any image, i.e. the uniform map (the "IASC without saliency" control)
- ``truth``: the synthetic corpus's ground-truth aesthetic masks (an upper bound; synthetic datasets only)
- ``shuffled``: another image's ground-truth mask (a fixed derangement within each split: a map of the right
  kind on the wrong image, the control that the map's place, not its presence, is what helps)
- ``moved``: the true mask moved onto another subject of the same image (its dilated silhouette; the mask-following
  counterfactual: a model that follows its map describes that subject)

Every source is store-like (``has(sha256)``, ``read(sha256) -> (map, category, score)``) or None (uniform).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SOURCES = ("eat", "uniform", "truth", "shuffled", "moved")
TRUTH_MAP_SIZE = 56  # masks are area-averaged to this grid: finer than EAT's 14 x 14, still small


class TruthMaps:
    """Ground-truth masks of a synthetic dataset as saliency maps, keyed by image sha256."""

    def __init__(self, dataset: str) -> None:
        from stages.synthetic.truth import ground_truth
        from storage.tables import read_table

        self.truth = truth = ground_truth(dataset)
        if truth is None:
            raise ValueError(f"--saliency truth needs a synthetic dataset with ground-truth masks; '{dataset}' has none")
        rows = sorted((r for r in read_table(dataset, "images").select(["image_id", "sha256", "split"]).to_pylist()
                       if r["image_id"] in truth), key=lambda r: r["image_id"])
        self.mask_of = {r["sha256"]: Path(truth[r["image_id"]]["mask"]) for r in rows}
        self.image_of = {r["sha256"]: r["image_id"] for r in rows}
        self.rows = rows

    def has(self, sha256: str) -> bool:
        return sha256 in self.mask_of

    def full_mask(self, sha256: str) -> Image.Image:
        """The image's map at full resolution, mode L (255: salient)."""
        with Image.open(self.mask_of[sha256]) as mask:
            return mask.convert("L")

    def read(self, sha256: str) -> tuple[np.ndarray, int, float]:
        """(mask area-averaged to TRUTH_MAP_SIZE^2 in [0, 1], no category, no score)."""
        small = self.full_mask(sha256).resize((TRUTH_MAP_SIZE, TRUTH_MAP_SIZE), Image.Resampling.BOX)
        return np.asarray(small, dtype=np.float32) / 255.0, -1, float("nan")


class ShuffledTruthMaps(TruthMaps):
    """Each image gets the ground-truth mask of the next image of its split (by image id; the last, the first's)."""

    def __init__(self, dataset: str) -> None:
        super().__init__(dataset)
        own, self.mask_of = self.mask_of, {}
        for split in {r["split"] for r in self.rows}:
            shas = [r["sha256"] for r in self.rows if r["split"] == split]
            self.mask_of.update({sha: own[other] for sha, other in zip(shas, shas[1:] + shas[:1])})


class MovedTruthMaps(TruthMaps):
    """Each image gets the dilated silhouette of another of its subjects (``truth.moved_subject``) as its mask."""

    def full_mask(self, sha256: str) -> Image.Image:
        from stages.synthetic.truth import moved_subject

        entry = self.truth[self.image_of[sha256]]
        with Image.open(entry["subject_labels"]) as labels:
            marked = np.asarray(labels) == moved_subject(entry) + 1
        return Image.fromarray(marked.astype(np.uint8) * 255)


def open_source(source: str, dataset: str, manifest: Any) -> tuple[Any | None, str]:
    """(store-like source or None, why None) for ``source``; None means every image gets the uniform map."""
    if source not in SOURCES:
        raise ValueError(f"saliency source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "uniform":
        return None, "saliency source 'uniform'"
    if source in ("truth", "shuffled", "moved"):
        return {"truth": TruthMaps, "shuffled": ShuffledTruthMaps, "moved": MovedTruthMaps}[source](dataset), ""
    from storage.saliency_store import find_store

    return find_store(manifest)


def open_saliency(source: str, dataset: str, manifest: Any, allow_missing: bool) -> tuple[Any | None, str]:
    """(saliency source or None, why None) for training and generation alike: without a store, and unless
    uniform maps are allowed, a :class:`MissingSaliencyError` that names the saliency stage."""
    from stages.families.data import MissingSaliencyError

    store, why = open_source(source, dataset, manifest)
    if store is None and not allow_missing:
        raise MissingSaliencyError(f"no saliency store ({why}): run the saliency stage first (`ase-mllm saliency`), "
                                   "or pass --allow-missing-saliency to use uniform maps")
    return store, why
