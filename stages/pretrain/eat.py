"""Pretrain the demo's EAT on the procedural pretraining corpus (the analogue of EAT's ImageNet + AVA weights).

Loss: the official EMD over the raw 10-bin outputs + ``score_weight`` x MSE of the official score read-out
(stages/saliency/train_eat.py) + the auxiliary image-level heads of stages/pretrain/targets.py on the pooled
final features (dropped when saving: the checkpoint has exactly the official EAT layout). From scratch
(trunc-normal init), AdamW, warmup then cosine, horizontal flips. Each epoch is evaluated on held-out
renders of the same stream: score SRCC, attribute accuracy and the LayerCAM mask ratio.
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

from stages.pretrain.targets import AuxHeads, Targets
from stages.saliency.eat import EAT, IMAGENET_MEAN, IMAGENET_STD, build_eat, eat_score, target_layer
from stages.saliency.layercam import layercam
from stages.saliency.train_eat import NUM_BINS, emd_loss, init_weights, mask_ratio, score_distribution, srcc
from stages.schedule import warmup_cosine


@dataclass(frozen=True)
class EatRecipe:
    variant: str = "tiny"
    epochs: int = 12
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    score_weight: float = 0.05
    aux_weight: float = 1.0
    seed: int = 0


def normalise(u8: Tensor) -> Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float, ImageNet mean / std (EAT's preprocessing)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (u8.permute(0, 3, 1, 2).float() / 255 - mean) / std


def evaluate(model: EAT, images: np.ndarray, records: list[dict[str, Any]], aux: AuxHeads | None = None,
             batch_size: int = 32) -> dict[str, Any]:
    """Score SRCC, LayerCAM mask ratio (map at ``stages.2`` inside the true mask / overall), where records carry
    subject "labels" the subject preference (mask ratio on the aesthetic subject / mean mask ratio on the
    others: 1 = no preference) and, with the heads, attribute accuracy, on [N, 224, 224, 3] images whose records
    carry "mask"."""
    model.eval()
    pooled: list[Tensor] = []
    hook = model.cls_norm.register_forward_hook(lambda m, i, o: pooled.append(o.detach().mean(dim=(2, 3))))
    scores, ratios, preferences = [], [], []
    try:
        for i in range(0, len(images), batch_size):
            x = normalise(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])))
            out = layercam(model, target_layer(model, "stages.2"), x)
            scores.append(eat_score(out.logits))
            ratios += [mask_ratio(cam, torch.from_numpy(r["mask"])) for cam, r in
                       zip(out.maps, records[i:i + batch_size]) if r["mask"].any()]
            preferences += [subject_preference(cam, r) for cam, r in zip(out.maps, records[i:i + batch_size])
                            if "labels" in r]
    finally:
        hook.remove()
    truth = Targets.of(records)
    result: dict[str, Any] = {"srcc": srcc(torch.cat(scores), truth.score), "mask_ratio": float(np.mean(ratios))}
    valid = [p for p in preferences if p is not None]
    if valid:
        result["subject_preference"] = float(np.exp(np.mean(np.log(valid))))  # geometric mean of the ratios
    if aux is not None:
        result["attributes"] = aux.attribute_accuracy(torch.cat(pooled), truth)
    return result


def subject_preference(cam: Tensor, record: dict[str, Any]) -> float | None:
    """Mask ratio of a map on the aesthetic subject's labelled silhouette over the mean of the other subjects'
    (None where a subject is not visible at 224 px)."""
    from stages.synthetic.corpus import N_SUBJECTS

    labels = torch.from_numpy(record["labels"])
    if not all((labels == k + 1).any() for k in range(N_SUBJECTS)):
        return None
    ratios = [mask_ratio(cam, labels == k + 1) for k in range(N_SUBJECTS)]
    others = [r for k, r in enumerate(ratios) if k != record["aesthetic"]]
    return ratios[record["aesthetic"]] / max(float(np.mean(others)), 1e-6)


def pretrain_eat(images: np.ndarray, records: list[dict[str, Any]], val: tuple[np.ndarray, list[dict[str, Any]]],
                 recipe: EatRecipe, out_path: Path) -> dict[str, Any]:
    """Train on [N, 224, 224, 3] uint8 images + records; save the official-layout state dict (safetensors)."""
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
    aux = AuxHeads(model.cls_head.in_features)
    pooled: list[Tensor] = []
    model.cls_norm.register_forward_hook(lambda m, i, o: pooled.append(o.mean(dim=(2, 3))))
    params = [*model.parameters(), *aux.parameters()]
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
            t = targets[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            pooled.clear()
            out = model(x)  # [b, 10] raw
            loss = (emd_loss(out, dists[idx]) + recipe.score_weight * F.mse_loss(eat_score(out), t.score)
                    + recipe.aux_weight * aux.loss(pooled[0], t))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        pooled.clear()
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), **evaluate(model, *val, aux=aux)}
        history.append(record)
        tqdm.write(f"pretrain EAT epoch {epoch + 1}: loss {record['loss']:.3f}, validation SRCC {record['srcc']:.3f}, "
                   f"mask ratio {record['mask_ratio']:.2f}, subject preference {record['subject_preference']:.2f}, "
                   f"attributes "
                   + " ".join(f"{k} {v:.2f}" for k, v in record["attributes"].items()))
    bar.close()
    model.eval()
    with atomic_path(out_path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"variant": recipe.variant, "num_classes": str(NUM_BINS)})
    return {"recipe": asdict(recipe), "n_images": len(images), "history": history,
            "validation": history[-1], "train_seconds": round(time.perf_counter() - start, 1)}
