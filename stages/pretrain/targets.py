"""Image-level pretraining targets of the synthetic scenes and the auxiliary heads that learn them.

What the generator drew for each image (its six aesthetic attributes, and the scene: subject pattern, sky,
ground, first subject hue, subject position, horizon height and angle) gives the demo models' encoders a
rich image-level signal, as ImageNet labels or web captions do for real encoders. Deliberately no spatial
target (no mask, no box): where the aesthetically relevant regions are is what the saliency stage must find
on its own, and what the demo measures against the true masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.synthetic.attributes import ATTRIBUTES
from stages.synthetic.corpus import GROUND_NAMES, PATTERN_NAMES, SKY_NAMES

HUE_BINS = 12
CLASSES: dict[str, int] = {**{k: len(v) for k, v in ATTRIBUTES.items()}, "pattern": len(PATTERN_NAMES),
                           "sky": len(SKY_NAMES), "ground": len(GROUND_NAMES), "hue": HUE_BINS}
REGRESSIONS = ("subject_x", "subject_y", "horizon_height", "horizon_angle")  # angle in tens of degrees


@dataclass(frozen=True)
class Targets:
    classes: Tensor  # [N, len(CLASSES)] int64 class index per categorical target
    values: Tensor  # [N, len(REGRESSIONS)] float32
    score: Tensor  # [N] float32 aesthetic score

    @staticmethod
    def of(records: list[dict[str, Any]]) -> "Targets":
        names = {"pattern": PATTERN_NAMES, "sky": SKY_NAMES, "ground": GROUND_NAMES}
        classes = []
        for r in records:
            row = [ATTRIBUTES[k].index(r["attributes"][k]) for k in ATTRIBUTES]
            row += [names[k].index(r["scene"][k]) for k in names]
            row.append(round(r["scene"]["hues"][0] * HUE_BINS) % HUE_BINS)
            classes.append(row)
        values = [[r["scene"][k] / (10.0 if k == "horizon_angle" else 1.0) for k in REGRESSIONS] for r in records]
        return Targets(torch.tensor(classes), torch.tensor(values, dtype=torch.float32),
                       torch.tensor([r["score"] for r in records], dtype=torch.float32))

    def __getitem__(self, idx: Tensor) -> "Targets":
        return Targets(self.classes[idx], self.values[idx], self.score[idx])


class AuxHeads(nn.Module):
    """One linear layer from a pooled feature [B, D] to every categorical and regression target."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, sum(CLASSES.values()) + len(REGRESSIONS))

    def forward(self, pooled: Tensor) -> tuple[list[Tensor], Tensor]:
        out = self.proj(pooled)  # [B, sum(classes) + R]
        logits = list(out[:, :-len(REGRESSIONS)].split(list(CLASSES.values()), dim=1))
        return logits, out[:, -len(REGRESSIONS):]

    def loss(self, pooled: Tensor, targets: Targets) -> Tensor:
        """Mean cross-entropy over the categorical targets + mean squared error of the regressions."""
        logits, values = self(pooled)
        ce = sum(F.cross_entropy(lg, targets.classes[:, j]) for j, lg in enumerate(logits)) / len(logits)
        return ce + F.mse_loss(values, targets.values)

    @torch.no_grad()
    def attribute_accuracy(self, pooled: Tensor, targets: Targets) -> dict[str, float]:
        logits, _ = self(pooled)
        return {k: float((logits[j].argmax(1) == targets.classes[:, j]).float().mean()) for j, k in enumerate(ATTRIBUTES)}
