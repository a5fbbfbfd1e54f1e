"""What ``ase-mllm serve`` does for a photo, apart from the page: read it, critique it under the map the user
chooses (the EAT's, uniform, painted, the true mask), mark the sentences that changed, and the forced choices
beside the truth. Every critique goes through :class:`stages.report.critique.Critic`, the entry ``caption`` uses.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stages.finetune.saliency_source import TRUTH_MAP_SIZE
from stages.report.critique import Critic, Critique, Photo, read_photo
from stages.report.known_truth import KnownTruth
from storage.images import ImageError, open_rgb

MAPS = ("EAT map", "uniform", "painted", "true mask")  # the map choices, in the order the page lists them
MAP_NAMES = {"EAT map": "the EAT map", "uniform": "the uniform map", "painted": "the painted map",
             "true mask": "the true mask"}
DISPLAY_SIDE = 512  # px: photos are shown (and painted on) at most this large
MAP_GRID = TRUTH_MAP_SIZE  # painted and given maps are area-averaged to the true masks' grid


@dataclass
class Shown:
    """One photo of a session: what was read and what the run said with the EAT map."""

    name: str
    photo: Photo
    eat: Critique
    sibling: str | None  # the no-IASC run's critique (it reads no map)


@dataclass
class Session:
    photos: list[Shown] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line per file that could not be read

    def named(self, name: str | None) -> Shown | None:
        """The photo called ``name``, else the first one (None: no photo)."""
        return next((s for s in self.photos if s.name == name), self.photos[0] if self.photos else None)


class UserError(Exception):
    """Something the user can fix, shown as it is."""


def sentences(text: str) -> list[str]:
    """A critique split after each ., ! or ? that ends a sentence."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def marked(text: str, before: str) -> list[tuple[str, str | None]]:
    """``text`` as (sentence, "changed" | None) pairs: "changed" where it is not in ``before``'s sentences (in order)."""
    now, then = sentences(text), sentences(before)
    out: list[tuple[str, str | None]] = []
    for op, i1, i2, _, _ in difflib.SequenceMatcher(a=now, b=then, autojunk=False).get_opcodes():
        out += [(s + " ", None if op == "equal" else "changed") for s in now[i1:i2]]
    return out


def unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name (2)``, ``name (3)``, ... when taken."""
    k, candidate = 1, name
    while candidate in taken:
        k += 1
        candidate = f"{name} ({k})"
    return candidate


def painted_map(editor: dict | None) -> np.ndarray:
    """The painted strokes of an image editor's layers as a map (:func:`on_grid`); a :class:`UserError` when nothing
    is painted."""
    layers = [np.asarray(layer) for layer in (editor or {}).get("layers") or [] if layer is not None]
    alpha = [layer[..., 3] for layer in layers if layer.ndim == 3 and layer.shape[2] == 4]  # [H, W] each
    if not alpha or max(int(a.max()) for a in alpha) == 0:
        raise UserError("The painted map is empty: paint over the part of the photo that matters (in \"Paint a "
                        "map\"), then choose \"painted\" again.")
    return on_grid((np.max(np.stack(alpha), axis=0) > 0).astype(np.float32))


def read_map(path: Path) -> np.ndarray:
    """A map given as an image file (grey levels; white: salient) on the map grid; refused when empty (all black)."""
    grey = np.asarray(open_rgb(path).convert("L"), dtype=np.float32) / 255.0  # [H, W]
    if grey.max() == 0:
        raise UserError("The map is empty (all black): white marks what matters; a constant grey or white map is "
                        "the uniform map.")
    return on_grid(grey)


def on_grid(full: np.ndarray) -> np.ndarray:
    """A map [H, W] in [0, 1] over the whole photo, area-averaged to [MAP_GRID, MAP_GRID] (the true masks' grid)."""
    small = Image.fromarray(full.astype(np.float32), mode="F").resize((MAP_GRID, MAP_GRID), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)


def display(image: Image.Image) -> Image.Image:
    """A copy of ``image`` at most DISPLAY_SIDE on its longer side."""
    shown = image.copy()
    shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    return shown


def overlay_of(photo: Photo, saliency_map: np.ndarray | None) -> Image.Image:
    """The map over the displayed photo (uniform: an even tint)."""
    from stages.saliency.overlay import overlay

    return overlay(display(photo.image), np.ones((2, 2)) if saliency_map is None else saliency_map)


class App:
    """The models and the dataset's truth; what the page and ``/critique`` ask of them."""

    def __init__(self, critic: Critic, sibling: Critic | None, truth: KnownTruth, examples: list[Path]) -> None:
        self.critic, self.sibling, self.truth, self.examples = critic, sibling, truth, examples
        self.session_files: dict[str, set[Path]] = {}

    # ---- reading
    def read(self, files: list[str] | None) -> Session:
        """Every file read and critiqued with its EAT map (by the run and its sibling); unreadable ones explained."""
        session = Session()
        photos: list[tuple[str, Photo]] = []
        names: set[str] = set()
        for path in files or []:
            name = unique(Path(path).name, names)
            names.add(name)
            try:
                photos.append((name, read_photo(Path(path))))
            except ImageError as e:
                session.errors.append(f"**{name}**: {explain(e)}")
        eats = self.critic.critique([p for _, p in photos])
        siblings = self.sibling.critique([p for _, p in photos]) if self.sibling else [None] * len(photos)
        session.photos = [Shown(name, photo, eat, s.text if s else None)
                          for (name, photo), eat, s in zip(photos, eats, siblings)]
        return session

    def remember(self, session_hash: str, files: list[str] | None) -> None:
        """Note a session's uploads, to delete them when it ends."""
        self.session_files.setdefault(session_hash, set()).update(Path(f) for f in files or [])

    def forget(self, session_hash: str) -> None:
        """Delete a finished session's uploads."""
        for path in self.session_files.pop(session_hash, set()):
            path.unlink(missing_ok=True)

    def critique_file(self, photo_path: Path, map_path: Path | None) -> tuple[float, dict[str, Any], Image.Image, str]:
        """What ``/critique`` answers: (EAT score, the map used {"shape", "values", "source"}, overlay, critique)."""
        photo = read_photo(photo_path)
        given = read_map(map_path) if map_path else None
        result = self.critic.critique([photo], None if given is None else [given])[0]
        used = result.used_map
        values = {"shape": list(used.shape), "values": used.astype(float).tolist(),
                  "source": result.map_source if given is None else "given"}
        return result.score, values, overlay_of(photo, used), result.text

    # ---- what a photo shows
    def map_for(self, shown: Shown, choice: str, editor: dict | None) -> np.ndarray | None:
        """The raw map of ``choice`` for one photo (None: uniform); ``editor``: the painting canvas's value."""
        if choice == "EAT map":
            return shown.eat.eat_map
        if choice == "uniform":
            return None
        if choice == "painted":
            return painted_map(editor)
        if choice == "true mask":
            if not self.truth.knows(shown.photo):
                raise UserError(f"{shown.name} is not an image of the dataset '{self.truth.dataset}': only its "
                                "images have a true mask.")
            return self.truth.true_mask(shown.photo)
        raise UserError(f"unknown map {choice!r}: choose one of {', '.join(MAPS)}")

    def view(self, shown: Shown, choice: str, editor: dict | None) -> dict[str, Any]:
        """Score, overlay, marked critique, forced choices and a status line for one photo under one map."""
        saliency_map = self.map_for(shown, choice, editor)
        result = shown.eat if choice == "EAT map" else self.critic.critique([shown.photo], [saliency_map])[0]
        critique = marked(result.text, shown.eat.text)
        status = f"Critique with {MAP_NAMES[choice]}"
        if choice != "EAT map":
            changed = sum(label == "changed" for _, label in critique)
            status += f": {changed} of {len(critique)} sentence(s) differ from the EAT map's critique"
        status += "." if self.critic.follows_map else f". This run ({self.critic.run}) reads no map."
        forced = None
        if self.truth.knows(shown.photo):
            chosen = self.truth.forced_choice(self.critic, shown.photo, saliency_map)
            true = self.truth.attributes(shown.photo)
            forced = [[key, value, true[key], "yes" if value == true[key] else "no"] for key, value in chosen.items()]
        return {"score": f"{shown.eat.score:.2f}", "overlay": overlay_of(shown.photo, saliency_map),
                "critique": critique, "status": status, "forced": forced}


def explain(error: ImageError) -> str:
    """An image error as a sentence for the page."""
    what = {"not_an_image": "not an image", "truncated_image": "the file is truncated",
            "corrupt_image": "the file is damaged", "too_many_pixels": "too many pixels (a decompression bomb?)",
            "too_small": "too small to critique", "empty_file": "the file is empty"}.get(error.reason, error.reason)
    return f"{what} ({error.detail.split(': ', 1)[-1]})"


