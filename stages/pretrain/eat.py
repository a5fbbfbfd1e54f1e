"""Pretrain the demo's EAT on the procedural pretraining corpus (the analogue of EAT's ImageNet + AVA weights).

Loss: the official EMD over the raw 10-bin outputs + ``score_weight`` x MSE of the official score read-out
(stages/saliency/train_eat.py) + the auxiliary heads of stages/pretrain/targets.py (dropped when saving: the
checkpoint has exactly the official EAT layout): dense on the stage-2 map (every subject's attributes, read where it
lies), pooled on the final features (the global attributes, and the aesthetic subject's attributes: what the photo
is rated on, as PCCD and AADB rate photos per attribute, never where its subject is). From scratch (trunc-normal
init), AdamW, warmup then cosine, horizontal flips (label maps and the horizon's angle flipped with them). Each epoch
is evaluated on held-out renders of the same stream: score SRCC, the LayerCAM mask ratio and subject preference,
and what the heads read.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from stages.pretrain.targets import AestheticHeads, AuxHeads, DenseHeads, Targets, dense_targets
from stages.saliency.eat import EAT, IMAGENET_MEAN, IMAGENET_STD, build_eat, eat_score, target_layer
from stages.saliency.layercam import layercam
from stages.saliency.train_eat import (NUM_BINS, emd_loss, init_weights, mask_ratio, preference_of,
                                      score_distribution, srcc, subject_preference)
from stages.synthetic.corpus import N_SUBJECTS
from stages.schedule import warmup_cosine


@dataclass(frozen=True)
class EatRecipe:
    variant: str = "small"
    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    score_weight: float = 0.05  # the score's MSE beside the EMD (0.5 made world-v3 training diverge)
    aux_weight: float = 1.0
    seed: int = 0


def normalise(u8: Tensor) -> Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float, ImageNet mean / std (EAT's preprocessing)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (u8.permute(0, 3, 1, 2).float() / 255 - mean) / std


class Heads(nn.Module):
    """The EAT's auxiliary heads (dropped when saving): dense on the stage-2 map (every subject's attributes under
    each cell), pooled on the final features (the global attributes; the aesthetic subject's attributes)."""

    def __init__(self, model: EAT) -> None:
        super().__init__()
        self.dense = DenseHeads(model.down_projs[1][0].out_channels)  # stage 2's width
        self.aux = AuxHeads(model.cls_head.in_features)
        self.aesthetic = AestheticHeads(model.cls_head.in_features)


class Taps:
    """Forward hooks keeping the stage-2 map [B, C, 14, 14] and the pooled final features [B, D] of the last call."""

    def __init__(self, model: EAT) -> None:
        self.stage2: Tensor | None = None
        self.pooled: Tensor | None = None
        self.handles = [target_layer(model, "stages.2").register_forward_hook(lambda m, i, o: self._keep("stage2", o)),
                        model.cls_norm.register_forward_hook(lambda m, i, o: self._keep("pooled", o.mean(dim=(2, 3))))]

    def _keep(self, name: str, value: Tensor) -> None:
        setattr(self, name, value)

    @property
    def cells(self) -> Tensor:
        """The stage-2 map as tokens [B, h * w, C]."""
        return self.stage2.flatten(2).transpose(1, 2)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def evaluate(model: EAT, images: np.ndarray, records: list[dict[str, Any]], heads: Heads | None = None,
             batch_size: int = 32) -> dict[str, Any]:
    """Score SRCC, LayerCAM mask ratio (map at ``stages.2`` inside the true mask / overall), where records carry
    subject "labels" the subject preference (mask ratio on the aesthetic subject / mean mask ratio on the
    others: 1 = no preference) and, with the heads, the global attributes' accuracy, each subject's attributes read
    from its stage-2 cells and the aesthetic subject's from the pooled features, on [N, 224, 224, 3] images whose
    records carry "mask"."""
    model.eval()
    taps = Taps(model)
    scores, ratios, preferences, pooled, cells = [], [], [], [], []
    try:
        for i in range(0, len(images), batch_size):
            x = normalise(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])))
            out = layercam(model, target_layer(model, "stages.2"), x)
            scores.append(eat_score(out.logits))
            pooled.append(taps.pooled.detach())
            cells.append(taps.cells.detach())
            ratios += [mask_ratio(cam, torch.from_numpy(r["mask"])) for cam, r in
                       zip(out.maps, records[i:i + batch_size]) if r["mask"].any()]
            preferences += [subject_preference(cam, torch.from_numpy(r["labels"]), r["aesthetic"], N_SUBJECTS)
                            for cam, r in zip(out.maps, records[i:i + batch_size]) if "labels" in r]
    finally:
        taps.remove()
    truth = Targets.of(records)
    result: dict[str, Any] = {"srcc": srcc(torch.cat(scores), truth.score), "mask_ratio": float(np.mean(ratios))}
    valid = [p for p in preferences if p is not None]
    if valid:
        result["subject_preference"] = preference_of(valid)
    if heads is not None:
        pooled_all = torch.cat(pooled)
        result["attributes"] = heads.aux.attribute_accuracy(pooled_all, truth)
        result["aesthetic_attributes"] = heads.aesthetic.accuracy(pooled_all, truth)
        if all("labels" in r for r in records):
            labels = torch.from_numpy(np.stack([r["labels"] for r in records]))
            grid = int(round(cells[0].shape[1] ** 0.5))
            result["cells_read"] = heads.dense.subject_accuracy(torch.cat(cells), labels, grid, truth)
    return result


def pretrain_eat(images: np.ndarray, labels: np.ndarray, records: list[dict[str, Any]],
                 val: tuple[np.ndarray, list[dict[str, Any]]], recipe: EatRecipe, out_path: Path) -> dict[str, Any]:
    """Train on [N, 224, 224, 3] uint8 images + their [N, 224, 224] subject label maps + records; save the
    official-layout state dict (safetensors)."""
    from safetensors.torch import save_file

    from storage.atomic import atomic_path

    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    targets = Targets.of(records)
    dists = score_distribution(targets.score)  # [N, 10]
    model = build_eat(recipe.variant, num_classes=NUM_BINS, drop_path_rate=0.0)
    init_weights(model)
    nn.init.zeros_(model.cls_head.weight)
    with torch.no_grad():
        model.cls_head.bias.copy_(dists.mean(dim=0))  # start at the mean distribution
    heads = Heads(model)
    taps = Taps(model)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
                                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=recipe.lr)
    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, steps_per_epoch // 2
    schedule = warmup_cosine(optimizer, total, warmup)
    generator = torch.Generator().manual_seed(recipe.seed)
    history = []
    bar = tqdm(total=total, desc=f"pretrain EAT-{recipe.variant}", unit="step")
    for epoch in range(recipe.epochs):
        model.train()
        losses = []
        for idx in torch.randperm(len(images), generator=generator).split(recipe.batch_size):
            idx = idx.sort().values  # ascending rows read the memory-mapped images in order
            x = normalise(torch.from_numpy(images[idx.numpy()]))  # [b, 3, 224, 224]
            label_maps = torch.from_numpy(labels[idx.numpy()])  # [b, 224, 224]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            label_maps = torch.where(flip[:, None, None], label_maps.flip(-1), label_maps)
            t = targets[idx].flipped(flip)
            out = model(x)  # [b, 10] raw
            cells = dense_targets(label_maps, t.subjects, taps.stage2.shape[-1])  # [b, 14 * 14, classes]
            loss = (emd_loss(out, dists[idx]) + recipe.score_weight * F.mse_loss(eat_score(out), t.score)
                    + recipe.aux_weight * (heads.dense.loss(taps.cells, cells) + heads.aux.loss(taps.pooled, t)
                                           + heads.aesthetic.loss(taps.pooled, t)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), **evaluate(model, *val, heads=heads)}
        history.append(record)
        tqdm.write(f"pretrain EAT epoch {epoch + 1}: loss {record['loss']:.3f}, validation SRCC {record['srcc']:.3f}, "
                   f"mask ratio {record['mask_ratio']:.2f}, subject preference {record['subject_preference']:.2f}, "
                   f"aesthetic subject's attributes "
                   + " ".join(f"{k} {v:.2f}" for k, v in record["aesthetic_attributes"].items())
                   + "; subjects read from their cells "
                   + " ".join(f"{k} {v:.2f}" for k, v in record["cells_read"].items()))
    bar.close()
    taps.remove()
    model.eval()
    with atomic_path(out_path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"variant": recipe.variant, "num_classes": str(NUM_BINS)})
    return {"recipe": asdict(recipe), "n_images": len(images), "history": history,
            "validation": history[-1], "train_seconds": round(time.perf_counter() - start, 1)}
