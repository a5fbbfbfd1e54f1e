"""Train an EAT scorer on a dataset's aesthetic scores when no official weights are at hand.

Targets: each score s becomes a 10-bin distribution over bins k = 1..10, a Gaussian
exp(-(k - s)^2 / 2) (sd 1) normalised to sum 1 (AVA's vote histograms play this role in the
official code). Loss: the official EMD (r = 2 on cumulative sums) over the RAW outputs (no
softmax), so the saved model outputs what ``eat_score`` (sum_k k * out_k, official) expects,
plus ``SCORE_WEIGHT`` x MSE(eat_score(out), score). Raw outputs need not sum to 1, and EMD on
their cumulative sums alone can lower a bin's cdf by shrinking the total mass, which moves
sum_k k * out_k the wrong way (seen here: strongly negative SRCC on a toy task); the score term
ties the official score read-out to the target. The head starts at the mean target
distribution (weights 0, bias = mean), i.e. at the mean score.

Recipe for from-scratch training (the official code fine-tunes ImageNet weights and resets
nothing, i.e. PyTorch's default init): Linear/conv weights trunc_normal(std .02), biases 0
(the DAT/Swin init; the head as above), no drop path, AdamW (weight decay on matrices only) with one warmup
epoch then cosine decay, gradient-norm clipping, horizontal flips. Images are resized once
to 224x224 (the EAT input) and kept in memory.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import spearmanr
from torch import Tensor, nn
from tqdm import tqdm

from stages.saliency.eat import (EAT, INPUT_SIZE, build_eat, eat_score, load_eat_weights, preprocess, target_layer,
                                 trunc_normal_)
from stages.saliency.layercam import layercam
from stages.schedule import warmup_cosine
from storage.images import open_rgb

NUM_BINS = 10
RECIPE_VERSION = 2  # bump when the training recipe changes (train-eat then retrains)
TARGET_SD = 1.0
SCORE_WEIGHT = 0.05  # weight of the expected-score MSE next to the EMD


def score_distribution(scores: Tensor, bins: int = NUM_BINS, sd: float = TARGET_SD) -> Tensor:
    """[N] scores in [1, bins] -> [N, bins] Gaussian (sd ``sd``) over bins 1..bins, rows sum to 1."""
    k = torch.arange(1, bins + 1, dtype=torch.float32)
    weights = torch.exp(-0.5 * ((k[None] - scores.float()[:, None]) / sd) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def emd_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Official EDMLoss: sqrt(mean((cdf(pred) - cdf(target))^2)) over the batch and bins."""
    return (pred.cumsum(dim=1) - target.cumsum(dim=1)).pow(2).mean().sqrt()


def load_images(paths: list[Path], desc: str = "loading images") -> Tensor:
    """[N,3,224,224] preprocessed images (resized once)."""
    return torch.stack([preprocess(open_rgb(p)) for p in tqdm(paths, desc=desc, unit="img", leave=False)])


def predict(model: EAT, images: Tensor, batch_size: int = 32) -> Tensor:
    """[N] predicted aesthetic scores."""
    model.eval()
    with torch.no_grad():
        return torch.cat([eat_score(model(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def srcc(pred: Tensor, true: Tensor) -> float:
    """Spearman rank correlation (nan when either side is constant)."""
    return float(spearmanr(pred.numpy(), true.numpy()).statistic)


def init_weights(model: EAT) -> None:
    """From-scratch init: Linear/conv weights trunc_normal(std .02), their biases 0 (norms keep 1/0)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def train_eat(samples: list[tuple[Path, float]], variant: str, out_path: Path, epochs: int = 40, seed: int = 0,
              val_samples: list[tuple[Path, float]] | None = None, batch_size: int = 8, lr: float = 1e-3,
              weight_decay: float = 0.05, drop_path_rate: float = 0.0, clip_norm: float = 1.0,
              score_weight: float = SCORE_WEIGHT, threads: int = 1, init: Path | None = None) -> dict:
    """Train ``variant`` on (image path, score) pairs, from scratch or fine-tuning the weights at ``init``;
    save .safetensors atomically.

    Recipe in the module docstring. Runs on ``threads`` intra-op threads (restored after): the
    tiny variants gain little from more, and on a shared, oversubscribed CPU two spinning
    threads made an epoch 10-20x slower here. Returns metrics: final train loss,
    train SRCC and, with ``val_samples``, validation SRCC; also the wall time.
    """
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(samples, variant, Path(out_path), epochs, seed, val_samples, batch_size, lr, weight_decay,
                      drop_path_rate, clip_norm, score_weight, start, init)
    finally:
        torch.set_num_threads(previous_threads)


def _train(samples: list[tuple[Path, float]], variant: str, out_path: Path, epochs: int, seed: int,
           val_samples: list[tuple[Path, float]] | None, batch_size: int, lr: float, weight_decay: float,
           drop_path_rate: float, clip_norm: float, score_weight: float, start: float, init: Path | None) -> dict:
    from safetensors.torch import save_file

    from storage.atomic import atomic_path

    torch.manual_seed(seed)
    images = load_images([p for p, _ in samples], "loading train images")  # [N,3,224,224]
    scores = torch.tensor([s for _, s in samples], dtype=torch.float32)
    targets = score_distribution(scores)  # [N,10]
    val = None
    if val_samples:
        val = (load_images([p for p, _ in val_samples], "loading val images"),
               torch.tensor([s for _, s in val_samples], dtype=torch.float32))

    model = build_eat(variant, num_classes=NUM_BINS, drop_path_rate=drop_path_rate)
    if init is not None:  # fine-tune pretrained weights, as the official EAT fine-tunes ImageNet ones
        load_eat_weights(model, init)
    else:
        init_weights(model)
        nn.init.zeros_(model.cls_head.weight)
        with torch.no_grad():
            model.cls_head.bias.copy_(targets.mean(dim=0))  # start at the mean distribution (raw outputs)
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]  # biases, norms, offset scales: no decay
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    schedule = warmup_cosine(optimizer, total, warmup)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    bar = tqdm(range(epochs), desc=f"train EAT-{variant}", unit="epoch")
    for epoch in bar:
        model.train()
        order = torch.randperm(len(images), generator=generator)
        losses = []
        for i in range(0, len(images), batch_size):
            idx = order[i:i + batch_size]
            x = images[idx]  # [b,3,224,224]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            out = model(x)  # [b,10] raw
            loss = emd_loss(out, targets[idx]) + score_weight * F.mse_loss(eat_score(out), scores[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        record = {"epoch": epoch + 1, "loss": sum(losses) / len(losses)}
        if val is not None:
            record["val_srcc"] = srcc(predict(model, val[0]), val[1])
        history.append(record)
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "epoch"})

    model.eval()
    metrics = {
        "variant": variant, "epochs": epochs, "seed": seed, "n_train": len(images), "init": str(init) if init else None,
        "train_loss": history[-1]["loss"] if history else None, "train_srcc": srcc(predict(model, images), scores),
        "history": history, "train_seconds": round(time.perf_counter() - start, 1),
    }
    if val is not None and history:
        metrics["val_srcc"] = history[-1]["val_srcc"]
    with atomic_path(out_path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"variant": variant, "num_classes": str(NUM_BINS)})
    return metrics


def mask_ratio(cam: Tensor, mask: Tensor) -> float:
    """mean(map inside mask) / mean(map); cam [h,w] is upsampled to the mask's [224,224] grid."""
    up = F.interpolate(cam[None, None], size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
    if up.sum() <= 0:
        return 1.0  # an all-zero map says nothing: count it as a uniform map
    return float(up[mask].mean() / up.mean())


def subject_preference(cam: Tensor, labels: Tensor, aesthetic: int, n_subjects: int) -> float | None:
    """Mask ratio of a map on the aesthetic subject's labelled silhouette (``labels`` [224, 224]: k + 1 where
    subject k lies) over the mean of the other subjects' (None where a subject is not visible at 224 px)."""
    if not all((labels == k + 1).any() for k in range(n_subjects)):
        return None
    ratios = [mask_ratio(cam, labels == k + 1) for k in range(n_subjects)]
    others = [r for k, r in enumerate(ratios) if k != aesthetic]
    return ratios[aesthetic] / max(sum(others) / len(others), 1e-6)


def preference_of(ratios: list[float]) -> float:
    """Geometric mean of per-image :func:`subject_preference` ratios (each floored at 1e-3: a map with nothing on
    the aesthetic subject counts as a thousandfold preference for the others, not as minus infinity)."""
    return float(np.exp(np.mean(np.log(np.maximum(ratios, 1e-3)))))


def load_mask(path: Path) -> Tensor:
    """[224,224] bool: the whole mask resized like its image (nearest), 255 = relevant."""
    with Image.open(path) as mask:
        img = mask.convert("L").resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.NEAREST)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(INPUT_SIZE, INPUT_SIZE) > 127


def evaluate_saliency(model: EAT, samples_with_masks: list[tuple[Path, float, Path | None]],
                      layer: str = "stages.2", batch_size: int = 16) -> dict:
    """LayerCAM quality and score quality on (image, true score, mask or None) triples.

    ``mask_ratio``: mean over images with a non-empty mask of mean(M inside mask) / mean(M)
    (1 = no better than a uniform map). ``srcc``: Spearman between predicted and true scores.
    """
    model.eval()
    module: nn.Module = target_layer(model, layer)
    preds, ratios = [], []
    for i in tqdm(range(0, len(samples_with_masks), batch_size), desc="evaluate saliency", unit="batch", leave=False):
        chunk = samples_with_masks[i:i + batch_size]
        x = torch.stack([preprocess(open_rgb(p)) for p, _, _ in chunk])
        out = layercam(model, module, x)
        preds.append(eat_score(out.logits))
        for cam, (_, _, mask_path) in zip(out.maps, chunk):
            if mask_path is not None:
                mask = load_mask(mask_path)
                if mask.any():
                    ratios.append(mask_ratio(cam, mask))
    true = torch.tensor([s for _, s, _ in samples_with_masks], dtype=torch.float32)
    return {
        "mask_ratio": sum(ratios) / len(ratios) if ratios else float("nan"),
        "n_masks": len(ratios),
        "srcc": srcc(torch.cat(preds), true),
        "n": len(samples_with_masks),
    }
