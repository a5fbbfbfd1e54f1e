"""Image-level pretraining targets of the synthetic scenes and the auxiliary heads that learn them.

What the generator drew for each image gives the demo models' encoders a rich image-level signal, as ImageNet
labels, web captions or PCCD's per-attribute scores do for real encoders. Two target sets:

- ``SCENE`` (the base captioner): per subject, in left-to-right order, its four attributes, pattern, first hue
  bin and centre; globally the horizon, noise, sky, ground, horizon height and angle. It never says which
  subject is the aesthetic one: which one to critique is learned in fine-tuning.
- ``AESTHETIC`` (the EAT, trained with horizontal flips, so every target is flip-invariant): the aesthetic
  subject's four attributes (the analogue of PCCD's per-attribute aesthetic scores), the global attributes,
  sky, ground and horizon height. Where that subject is, the EAT must find (by its cue).

Deliberately no spatial target beyond the subjects' centres (no mask, no box).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.synthetic.attributes import ATTRIBUTES, POSITIONS, left_to_right
from stages.synthetic.corpus import GROUND_NAMES, PATTERN_NAMES, SKY_NAMES, SUBJECT_ATTRIBUTES

HUE_BINS = 12
GLOBAL_ATTRIBUTES = tuple(k for k in ATTRIBUTES if k not in SUBJECT_ATTRIBUTES)
_SETTING: dict[str, int] = {**{k: len(ATTRIBUTES[k]) for k in GLOBAL_ATTRIBUTES}, "sky": len(SKY_NAMES),
                            "ground": len(GROUND_NAMES)}


def _setting_classes(record: dict[str, Any]) -> list[int]:
    return [*(ATTRIBUTES[key].index(record["attributes"][key]) for key in GLOBAL_ATTRIBUTES),
            SKY_NAMES.index(record["scene"]["sky"]), GROUND_NAMES.index(record["scene"]["ground"])]


def _scene_classes(record: dict[str, Any]) -> list[int]:
    scene, row = record["scene"], []
    for k in left_to_right(scene):
        attrs, drawn = record["subjects"][k], scene["subjects"][k]
        row += [ATTRIBUTES[key].index(attrs[key]) for key in SUBJECT_ATTRIBUTES]
        row += [PATTERN_NAMES.index(drawn["pattern"]), round(drawn["hues"][0] * HUE_BINS) % HUE_BINS]
    return row + _setting_classes(record)


def _scene_values(record: dict[str, Any]) -> list[float]:
    scene = record["scene"]
    centres = [v for k in left_to_right(scene) for v in (scene["subjects"][k]["x"], scene["subjects"][k]["y"])]
    return centres + [scene["horizon_height"], scene["horizon_angle"] / 10.0]  # angle in tens of degrees


def _aesthetic_classes(record: dict[str, Any]) -> list[int]:
    return [ATTRIBUTES[key].index(record["attributes"][key]) for key in SUBJECT_ATTRIBUTES] + _setting_classes(record)


@dataclass(frozen=True)
class TargetSet:
    classes: dict[str, int]  # categorical target -> number of classes
    regressions: tuple[str, ...]
    class_row: Callable[[dict[str, Any]], list[int]]
    value_row: Callable[[dict[str, Any]], list[float]]


_PER_SUBJECT: dict[str, int] = {**{k: len(ATTRIBUTES[k]) for k in SUBJECT_ATTRIBUTES}, "pattern": len(PATTERN_NAMES),
                                "hue": HUE_BINS}
SCENE = TargetSet({**{f"{pos} {k}": n for pos in POSITIONS for k, n in _PER_SUBJECT.items()}, **_SETTING},
                  (*(f"{pos} {axis}" for pos in POSITIONS for axis in ("x", "y")), "horizon_height", "horizon_angle"),
                  _scene_classes, _scene_values)
AESTHETIC = TargetSet({**{f"aesthetic {k}": len(ATTRIBUTES[k]) for k in SUBJECT_ATTRIBUTES}, **_SETTING},
                      ("horizon_height",), _aesthetic_classes, lambda r: [r["scene"]["horizon_height"]])


@dataclass(frozen=True)
class Targets:
    classes: Tensor  # [N, len(target_set.classes)] int64 class index per categorical target
    values: Tensor  # [N, len(target_set.regressions)] float32
    score: Tensor  # [N] float32 aesthetic score

    @staticmethod
    def of(records: list[dict[str, Any]], target_set: TargetSet) -> "Targets":
        return Targets(torch.tensor([target_set.class_row(r) for r in records]),
                       torch.tensor([target_set.value_row(r) for r in records], dtype=torch.float32),
                       torch.tensor([r["score"] for r in records], dtype=torch.float32))

    def __getitem__(self, idx: Tensor) -> "Targets":
        return Targets(self.classes[idx], self.values[idx], self.score[idx])


class AuxHeads(nn.Module):
    """One linear layer from a pooled feature [B, D] to every categorical and regression target of a set."""

    def __init__(self, dim: int, target_set: TargetSet) -> None:
        super().__init__()
        self.target_set = target_set
        self.proj = nn.Linear(dim, sum(target_set.classes.values()) + len(target_set.regressions))

    def forward(self, pooled: Tensor) -> tuple[list[Tensor], Tensor]:
        n_values = len(self.target_set.regressions)
        out = self.proj(pooled)  # [B, sum(classes) + R]
        logits = list(out[:, :-n_values].split(list(self.target_set.classes.values()), dim=1))
        return logits, out[:, -n_values:]

    def loss(self, pooled: Tensor, targets: Targets) -> Tensor:
        """Mean cross-entropy over the categorical targets + mean squared error of the regressions."""
        logits, values = self(pooled)
        ce = sum(F.cross_entropy(lg, targets.classes[:, j]) for j, lg in enumerate(logits)) / len(logits)
        return ce + F.mse_loss(values, targets.values)

    @torch.no_grad()
    def attribute_accuracy(self, pooled: Tensor, targets: Targets) -> dict[str, float]:
        """Accuracy per categorical target that is an attribute (per subject position, or the aesthetic one's)."""
        logits, _ = self(pooled)
        return {name: (logits[j].argmax(1) == targets.classes[:, j]).float().mean().item()
                for j, name in enumerate(self.target_set.classes) if name.split(" ")[-1] in ATTRIBUTES}
