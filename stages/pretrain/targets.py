"""Pretraining targets of the synthetic scenes and the auxiliary heads that learn them.

What the generator drew for each image gives the demo models' encoders a rich signal, as ImageNet labels, web
captions and dense (segmentation-style) labels do for real encoders:

- dense, per token: the attributes, pattern and first hue bin of the subject under the token's cell centre
  (``DENSE``; background cells have none), read from the image's subject label map. Every subject is labelled the
  same way, so nothing says which one is the aesthetic subject (that is what the saliency stage and fine-tuning
  must find). Without them the base's tokens held the subjects' colour and focus too weakly for its descriptions
  to name them (held-out accuracy about chance; the README's "The demo's pretrained models");
- pooled, per image: the global attributes (horizon, noise), sky and ground, horizon height and angle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.synthetic.attributes import ATTRIBUTES, GLOBAL_ATTRIBUTES, SUBJECT_ATTRIBUTES
from stages.synthetic.corpus import GROUND_NAMES, PATTERN_NAMES, SKY_NAMES

HUE_BINS = 12
DENSE: dict[str, int] = {**{k: len(ATTRIBUTES[k]) for k in SUBJECT_ATTRIBUTES}, "pattern": len(PATTERN_NAMES),
                         "hue": HUE_BINS}
CLASSES: dict[str, int] = {**{k: len(ATTRIBUTES[k]) for k in GLOBAL_ATTRIBUTES}, "sky": len(SKY_NAMES),
                           "ground": len(GROUND_NAMES)}
REGRESSIONS = ("horizon_height", "horizon_angle")  # angle in tens of degrees


def _subject_classes(record: dict[str, Any]) -> list[list[int]]:
    """Per subject (annotation order): its ``DENSE`` class indices."""
    return [[ATTRIBUTES[key].index(attrs[key]) for key in SUBJECT_ATTRIBUTES]
            + [PATTERN_NAMES.index(drawn["pattern"]), round(drawn["hues"][0] * HUE_BINS) % HUE_BINS]
            for attrs, drawn in zip(record["subjects"], record["scene"]["subjects"])]


def _classes(record: dict[str, Any]) -> list[int]:
    scene = record["scene"]
    return ([ATTRIBUTES[key].index(record["attributes"][key]) for key in GLOBAL_ATTRIBUTES]
            + [SKY_NAMES.index(scene["sky"]), GROUND_NAMES.index(scene["ground"])])


@dataclass(frozen=True)
class Targets:
    classes: Tensor  # [N, len(CLASSES)] int64 class index per pooled categorical target
    values: Tensor  # [N, len(REGRESSIONS)] float32
    score: Tensor  # [N] float32 aesthetic score
    subjects: Tensor  # [N, subjects, len(DENSE)] int64 each subject's dense classes
    aesthetic: Tensor  # [N, len(SUBJECT_ATTRIBUTES)] int64 the aesthetic subject's attributes (EAT only)

    @staticmethod
    def of(records: list[dict[str, Any]]) -> "Targets":
        subjects = torch.tensor([_subject_classes(r) for r in records])  # [N, subjects, C]
        aesthetic = torch.tensor([r["aesthetic"] for r in records])
        return Targets(torch.tensor([_classes(r) for r in records]),
                       torch.tensor([[r["scene"]["horizon_height"], r["scene"]["horizon_angle"] / 10.0]
                                     for r in records], dtype=torch.float32),
                       torch.tensor([r["score"] for r in records], dtype=torch.float32), subjects,
                       subjects[torch.arange(len(records)), aesthetic, :len(SUBJECT_ATTRIBUTES)])

    def __getitem__(self, idx: Tensor) -> "Targets":
        return Targets(self.classes[idx], self.values[idx], self.score[idx], self.subjects[idx], self.aesthetic[idx])

    def flipped(self, flip: Tensor) -> "Targets":
        """The targets of the rows' mirror images where ``flip`` [B] is set (the horizon's angle changes sign)."""
        values = self.values.clone()
        values[flip, REGRESSIONS.index("horizon_angle")] *= -1
        return Targets(self.classes, values, self.score, self.subjects, self.aesthetic)


def dense_targets(labels: Tensor, subjects: Tensor, grid: int) -> Tensor:
    """Per cell of a ``grid`` x ``grid`` split of [B, S, S] subject label maps (k + 1 where subject k lies), the
    dense classes of the subject under the cell's centre, -1 for background: [B, grid * grid, len(DENSE)]."""
    b, size = labels.shape[0], labels.shape[-1]
    step = size // grid
    centres = labels[:, step // 2::step, step // 2::step][:, :grid, :grid].long().flatten(1)  # [B, g*g], 0: none
    table = torch.cat([torch.full_like(subjects[:, :1], -1), subjects], dim=1)  # [B, 1 + subjects, C]
    return table.gather(1, centres[..., None].expand(-1, -1, subjects.shape[-1]))  # [B, g*g, C]


class DenseHeads(nn.Module):
    """One linear layer from each token [B, N, D] to every ``DENSE`` target of the subject under it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, sum(DENSE.values()))

    def forward(self, tokens: Tensor) -> list[Tensor]:
        return list(self.proj(tokens).split(list(DENSE.values()), dim=-1))  # each [B, N, classes]

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean over the ``DENSE`` targets of the cross-entropy over subject tokens (``targets`` [B, N, C], -1:
        background, ignored)."""
        logits = self(tokens)
        return sum(F.cross_entropy(lg.flatten(0, 1), targets[..., j].flatten(), ignore_index=-1)
                   for j, lg in enumerate(logits)) / len(logits)

    @torch.no_grad()
    def subject_accuracy(self, tokens: Tensor, labels: Tensor, grid: int, targets: Targets) -> dict[str, float]:
        """Per subject attribute, the share of (image, visible subject) pairs whose tokens' mean logits pick the
        true value (``labels`` [B, S, S], tokens [B, grid * grid, D])."""
        logits = self(tokens)
        step = labels.shape[-1] // grid
        cells = labels[:, step // 2::step, step // 2::step][:, :grid, :grid].long().flatten(1)  # [B, g*g]
        hits: dict[str, list[bool]] = {k: [] for k in SUBJECT_ATTRIBUTES}
        for b in range(tokens.shape[0]):
            for k in range(targets.subjects.shape[1]):
                where = cells[b] == k + 1
                if where.any():
                    for j, key in enumerate(SUBJECT_ATTRIBUTES):
                        hits[key].append(bool(logits[j][b, where].mean(0).argmax() == targets.subjects[b, k, j]))
        return {k: sum(v) / max(len(v), 1) for k, v in hits.items()}


class AestheticHeads(nn.Module):
    """One linear layer from a pooled feature [B, D] to the aesthetic subject's attributes: what the photo is rated on
    (as PCCD's and AADB's per-attribute scores rate a photo), never where that subject is. The EAT's only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.sizes = [len(ATTRIBUTES[k]) for k in SUBJECT_ATTRIBUTES]
        self.proj = nn.Linear(dim, sum(self.sizes))

    def loss(self, pooled: Tensor, targets: Targets) -> Tensor:
        logits = self.proj(pooled).split(self.sizes, dim=1)
        return sum(F.cross_entropy(lg, targets.aesthetic[:, j]) for j, lg in enumerate(logits)) / len(logits)

    @torch.no_grad()
    def accuracy(self, pooled: Tensor, targets: Targets) -> dict[str, float]:
        logits = self.proj(pooled).split(self.sizes, dim=1)
        return {k: (lg.argmax(1) == targets.aesthetic[:, j]).float().mean().item()
                for j, (k, lg) in enumerate(zip(SUBJECT_ATTRIBUTES, logits))}


class AuxHeads(nn.Module):
    """One linear layer from a pooled feature [B, D] to every pooled categorical and regression target."""

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
        """Accuracy per global attribute."""
        logits, _ = self(pooled)
        return {name: (logits[j].argmax(1) == targets.classes[:, j]).float().mean().item()
                for j, name in enumerate(CLASSES) if name in GLOBAL_ATTRIBUTES}
