"""The one inference entry for photos: photo (and optionally a map) in; EAT score, saliency map and critique out.

``ase-mllm caption`` and ``ase-mllm serve`` both critique through :class:`Critic`, so the app adds no second
inference path. A photo's map is the saliency store's when the store holds its sha256, else computed with the
manifest's EAT + LayerCAM (the stage-1 code path, :func:`stages.saliency.job.compute_map`); its score comes
from the same place. A critique is made with that map unless the caller gives another one (None: uniform).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.manifest import Manifest
from stages.families.captioner import DecodeConfig
from storage.images import ImageError, open_rgb, sha256_file

MIN_SIDE = 32  # px: below this a photo has no composition to critique (a 1 x 1 file is refused, not upscaled)
EAT_CACHE = 64  # photos whose EAT map and score a Critic keeps (a user moving the map asks for them again)
# what reading a file did to its pixels, by the file's PIL mode (open_rgb converts these to 8-bit RGB)
CONVERSIONS = {
    "CMYK": "converted from CMYK to RGB",
    "I;16": "16-bit greyscale scaled to 8 bits", "I;16B": "16-bit greyscale scaled to 8 bits",
    "I;16L": "16-bit greyscale scaled to 8 bits", "I": "32-bit greyscale scaled to 8 bits",
    "RGBA": "transparency composited on white", "LA": "transparency composited on white",
    "P": "palette colours expanded to RGB", "L": "greyscale shown as RGB", "1": "black-and-white shown as RGB",
}


@dataclass(frozen=True)
class Photo:
    image: Image.Image  # upright 8-bit RGB
    sha256: str  # of the file's bytes: the saliency store's key
    note: str = ""  # what reading changed, e.g. "converted from CMYK to RGB"


@dataclass(frozen=True)
class Critique:
    text: str
    score: float  # the EAT's aesthetic score of the photo
    eat_map: np.ndarray  # [h, w] raw LayerCAM map of the photo (14 x 14 for the default EAT target)
    map_source: str  # "store" | "computed": where eat_map and score came from
    used_map: np.ndarray | None  # the map the critique was made with (None: uniform)


def read_photo(path: Path) -> Photo:
    """A photo file as :class:`Photo`; an :class:`ImageError` (reason: detail) when it cannot be critiqued."""
    image = open_rgb(path)
    if min(image.size) < MIN_SIDE:
        raise ImageError("too_small", f"{Path(path).name}: {image.width} x {image.height} pixels; a photo needs at "
                                      f"least {MIN_SIDE} pixels on each side")
    with Image.open(path) as header:  # open_rgb has decoded it, so the header reads
        note = CONVERSIONS.get(header.mode, "")
    return Photo(image, sha256_file(path), note)


class EatSaliency:
    """Maps and scores by sha256: the saliency store's, else computed with the manifest's EAT (loaded on first
    need); the last :data:`EAT_CACHE` photos' are kept, so a photo asked for again costs nothing."""

    def __init__(self, manifest: Manifest) -> None:
        from storage.saliency_store import find_store

        self.manifest = manifest
        self.store, _ = find_store(manifest)
        self._model: tuple[Any, Any, Any] | None = None
        self._known: OrderedDict[str, tuple[np.ndarray, float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, photo: Photo) -> tuple[np.ndarray, float, str]:
        """(raw map [h, w], aesthetic score, "store" | "computed") of ``photo``."""
        with self._lock:
            if photo.sha256 not in self._known:
                self._known[photo.sha256] = self._find(photo)
                if len(self._known) > EAT_CACHE:
                    self._known.popitem(last=False)
            self._known.move_to_end(photo.sha256)
            return self._known[photo.sha256]

    def _find(self, photo: Photo) -> tuple[np.ndarray, float, str]:
        if self.store is not None and self.store.has(photo.sha256):
            sal, _category, score = self.store.read(photo.sha256)
            return sal, float(score), "store"
        from stages.saliency.job import compute_map, load_manifest_model

        if self._model is None:
            self._model = load_manifest_model(self.manifest)
        sal, _category, score = compute_map(self._model, photo.image)
        return sal, score, "computed"


class Critic:
    """A run's captioner beside the EAT saliency: photos (and optionally maps) in, :class:`Critique` out."""

    def __init__(self, captioner: Any, saliency: EatSaliency, decode: DecodeConfig = DecodeConfig(),
                 run: str = "", checkpoint: str = "") -> None:
        self.captioner, self.saliency, self.decode = captioner, saliency, decode
        self.run, self.checkpoint = run, checkpoint  # "dataset/run", e.g. "final"
        self.lock = threading.Lock()  # one model, one caller at a time

    @classmethod
    def load(cls, saliency: EatSaliency, dataset: str, run: str, checkpoint: str | None = None,
             decode: DecodeConfig = DecodeConfig()) -> "Critic":
        """The critic of ``runs/<dataset>/<run>`` (its ``checkpoint``: default final/, else the newest)."""
        from stages.report.generate import load_run

        captioner, ckpt, _ = load_run(dataset, run, checkpoint)
        return cls(captioner, saliency, decode, f"{dataset}/{run}", ckpt)

    @property
    def name(self) -> str:
        return f"{self.run}/{self.checkpoint}"

    @property
    def follows_map(self) -> bool:
        """Whether the run reads a saliency map at all (IASC); a ``--fusion none`` run ignores it."""
        return bool(self.captioner.needs_saliency)

    def critique(self, photos: list[Photo], maps: list[np.ndarray | None] | None = None) -> list[Critique]:
        """One critique per photo, generated as one batch: with each photo's EAT map, or with ``maps[i]`` (raw, in
        normalised full-image coordinates, any size; None or constant: uniform) when ``maps`` is given."""
        if maps is not None and len(maps) != len(photos):
            raise ValueError(f"{len(maps)} maps for {len(photos)} photos")
        eats = [self.saliency(p) for p in photos]
        used = [e[0] for e in eats] if maps is None else list(maps)
        with self.lock:
            prompts = [self.captioner.prepare(p.image, m) for p, m in zip(photos, used)]
            texts = self.captioner.generate(prompts, self.decode) if prompts else []
        return [Critique(text, score, sal, source, m) for text, (sal, score, source), m in zip(texts, eats, used)]
