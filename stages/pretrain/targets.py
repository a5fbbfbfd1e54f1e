"""Image-level pretraining targets of the synthetic scenes and the auxiliary heads that learn them.

What the generator drew for each image gives the demo models' encoders a rich image-level signal, as ImageNet
labels or web captions do for real encoders: per subject, in left-to-right order, its four attributes,
pattern, first hue bin and centre; globally the horizon, noise, sky, ground, horizon height and angle. The
targets never say which subject is the aesthetic one (that is what the saliency stage and fine-tuning must
find), and deliberately no spatial target beyond the subjects' centres (no mask, no box).

Known imprecision: the EAT's pretraining flips images horizontally without flipping these targets, so on half
of its batches "left" and "right" (and the centres' x, the horizon's angle) are mirrored; the shipped EAT was
trained so. (A trial with a flip-invariant set, the aesthetic subject's attributes instead of the positions, found
the aesthetic subject no better: subject preference 0.78 after 4 of 8 epochs, where it was stopped.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.synthetic.attributes import ATTRIBUTES, GLOBAL_ATTRIBUTES, POSITIONS, SUBJECT_ATTRIBUTES, left_to_right
from stages.synthetic.corpus import GROUND_NAMES, PATTERN_NAMES, SKY_NAMES

HUE_BINS = 12
_PER_SUBJECT: dict[str, int] = {**{k: len(ATTRIBUTES[k]) for k in SUBJECT_ATTRIBUTES}, "pattern": len(PATTERN_NAMES),
                                "hue": HUE_BINS}
CLASSES: dict[str, int] = {**{f"{pos} {k}": n for pos in POSITIONS for k, n in _PER_SUBJECT.items()},
                           **{k: len(ATTRIBUTES[k]) for k in GLOBAL_ATTRIBUTES},
                           "sky": len(SKY_NAMES), "ground": len(GROUND_NAMES)}
REGRESSIONS = (*(f"{pos} {axis}" for pos in POSITIONS for axis in ("x", "y")), "horizon_height",
               "horizon_angle")  # angle in tens of degrees


def _classes(record: dict[str, Any]) -> list[int]:
    scene = record["scene"]
    row = []
    for k in left_to_right(scene):
        attrs, drawn = record["subjects"][k], scene["subjects"][k]
        row += [ATTRIBUTES[key].index(attrs[key]) for key in SUBJECT_ATTRIBUTES]
        row += [PATTERN_NAMES.index(drawn["pattern"]), round(drawn["hues"][0] * HUE_BINS) % HUE_BINS]
    row += [ATTRIBUTES[key].index(record["attributes"][key]) for key in GLOBAL_ATTRIBUTES]
    return row + [SKY_NAMES.index(scene["sky"]), GROUND_NAMES.index(scene["ground"])]


def _values(record: dict[str, Any]) -> list[float]:
    scene = record["scene"]
    centres = [v for k in left_to_right(scene) for v in (scene["subjects"][k]["x"], scene["subjects"][k]["y"])]
    return centres + [scene["horizon_height"], scene["horizon_angle"] / 10.0]


@dataclass(frozen=True)
class Targets:
    classes: Tensor  # [N, len(CLASSES)] int64 class index per categorical target
    values: Tensor  # [N, len(REGRESSIONS)] float32
    score: Tensor  # [N] float32 aesthetic score

    @staticmethod
    def of(records: list[dict[str, Any]]) -> "Targets":
        return Targets(torch.tensor([_classes(r) for r in records]),
                       torch.tensor([_values(r) for r in records], dtype=torch.float32),
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
        """Accuracy per attribute (the subjects' averaged over the three positions)."""
        logits, _ = self(pooled)
        hits = {name: (logits[j].argmax(1) == targets.classes[:, j]).float().mean().item()
                for j, name in enumerate(CLASSES)}
        return {k: sum(hits[f"{pos} {k}"] for pos in POSITIONS) / len(POSITIONS) if k in SUBJECT_ATTRIBUTES
                else hits[k] for k in ATTRIBUTES}
