"""What a synthetic dataset knows about a photo it holds: the true aesthetic mask, the true attribute values, and a
run's forced choice per attribute beside them (``stages/report/forced_choice.py``), for ``ase-mllm serve``.

A photo is recognised by the sha256 of its bytes among the dataset's images. Forced choices are centred as the
report centres them: on the mean over the dataset's validation split, each validation image with its EAT map
(computed once, on the first synthetic photo), so a test image shown with its EAT map gets the report's choice.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stages.report.critique import Critic, Photo


class KnownTruth:
    """The ground truth of a synthetic ``dataset`` by photo sha256 (nothing for a real dataset)."""

    def __init__(self, dataset: str) -> None:
        from stages.synthetic.truth import ground_truth
        from storage.tables import read_table

        self.dataset = dataset
        self.truth = ground_truth(dataset) or {}
        rows = read_table(dataset, "images").to_pylist() if self.truth else []
        self.rows = {r["sha256"]: r for r in rows if r["image_id"] in self.truth}
        self._masks: Any = None
        self._prior: np.ndarray | None = None

    def knows(self, photo: Photo) -> bool:
        return photo.sha256 in self.rows

    def image_id(self, photo: Photo) -> str:
        return self.rows[photo.sha256]["image_id"]

    def attributes(self, photo: Photo) -> dict[str, str]:
        """Attribute -> true value: the aesthetic subject's four, then horizon and noise."""
        return self.truth[self.image_id(photo)]["attributes"]

    def true_mask(self, photo: Photo) -> np.ndarray:
        """The photo's true aesthetic mask as a map [56, 56] in [0, 1] (what ``--saliency truth`` trains with)."""
        from stages.finetune.saliency_source import TruthMaps

        if self._masks is None:
            self._masks = TruthMaps(self.dataset)
        return self._masks.read(photo.sha256)[0]

    def forced_choice(self, critic: Critic, photo: Photo, saliency_map: np.ndarray | None) -> dict[str, str]:
        """Attribute -> the value ``critic``'s run finds likeliest to say of ``photo`` under ``saliency_map``."""
        from stages.report.forced_choice import candidates, forced_choices

        cands = candidates(critic.captioner.tokenizer)
        if self._prior is None:
            self._prior = np.mean([self._logprobs(critic, p, critic.saliency(p)[0], cands)
                                   for p in self._validation_photos()], axis=0)  # [K]
        own = self._logprobs(critic, photo, saliency_map, cands)
        return forced_choices({0: own}, cands, self._prior)[0]

    @staticmethod
    def _logprobs(critic: Critic, photo: Photo, saliency_map: np.ndarray | None, cands: Any) -> np.ndarray:
        from stages.report.forced_choice import phrasing_logprobs

        with critic.lock:
            return phrasing_logprobs(critic.captioner, critic.captioner.prepare(photo.image, saliency_map), cands)

    def _validation_photos(self) -> list[Photo]:
        from stages.report.critique import read_photo
        from storage.images import safe_join
        from storage.tables import image_root

        root = image_root(self.dataset)
        rows = sorted((r for r in self.rows.values() if r["split"] == "validation"), key=lambda r: r["image_id"])
        return [read_photo(safe_join(root, r["path"])) for r in rows]
