"""How much of the aesthetic subject the base's image tokens already hold: the study's ceiling for a map.

The frozen base (the model the study's runs were fine-tuned from, no fusion) turns each image into one tile's grid
of LLM tokens [N, D]. They are pooled three ways: weighted by the true mask (what a perfect map selects), evenly
(no map) and over the silhouette of the subject a moved mask marks (``truth.moved_subject``: the wrong subject).
Per attribute of the aesthetic subject, a multinomial logistic regression (L2, L-BFGS) fit on the train split is
scored on the test split against the generator's truth; nothing is chosen with it. A linear reader of the
mask-pooled tokens far above the evenly pooled ones means the base sees the attribute and selection is what the
map must add; a reader at the majority rate either way means no map can help with it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.manifest import Manifest
from pipeline.paths import study_dir
from stages.synthetic.attributes import SUBJECT_ATTRIBUTES
from storage.atomic import write_json_atomic

POOLINGS = ("true_mask", "even", "other_subject")


def pooling_weights(mask: Image.Image, labels: Image.Image, other: int, side: int) -> np.ndarray:
    """[3, side * side] token weights of one image (``POOLINGS`` order): its mask's mean over each token's cell,
    1 everywhere, 1 where the other subject's label (``other`` + 1) covers the token's cell centre."""
    true_mask = np.asarray(mask.convert("L").resize((side, side), Image.Resampling.BOX), np.float32) / 255
    subject = np.asarray(labels.resize((side, side), Image.Resampling.NEAREST)) == other + 1
    return np.stack([true_mask.ravel(), np.ones(side * side, np.float32), subject.ravel().astype(np.float32)])


def pooled(tokens: torch.Tensor, weights: np.ndarray) -> np.ndarray:
    """tokens [N, D], weights [P, N] -> [P, D] weighted means (an all-zero weight row gives the even mean)."""
    w = torch.as_tensor(weights, dtype=tokens.dtype)
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    return ((w @ tokens) / w.sum(1, keepdim=True)).numpy()


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """Multinomial logistic regression on standardised features ([n, D] -> labels), L-BFGS; test predictions."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    classes, y = np.unique(y_train, return_inverse=True)
    x = torch.as_tensor((x_train - mean) / std, dtype=torch.float64)
    target = torch.as_tensor(y)
    weight = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ weight + bias, target) + l2 * weight.pow(2).sum()
        value.backward()
        return value

    optimiser.step(loss)
    test = torch.as_tensor((x_test - mean) / std, dtype=torch.float64)
    return classes[(test @ weight + bias).argmax(1).numpy()]


def feature_probe(dataset: str, like: str, manifest: Manifest | None) -> dict[str, Any]:
    """{"per_attribute": {pooling: {attribute: accuracy}}, "majority": {attribute: accuracy}, "mean": {pooling:
    accuracy}, "train_images", "test_images"} for the base the run ``like`` was fine-tuned from; cached in
    ``reports/<dataset>/study/feature_probe.json`` while that base and the images are unchanged."""
    from stages.report.attributes import majority_values
    from stages.report.generate import load_run, prepare_untrained, split_images
    from stages.synthetic.truth import ground_truth, moved_subject
    from storage.images import open_rgb, safe_join
    from storage.tables import image_root

    truth = ground_truth(dataset)
    if truth is None:
        raise ValueError(f"the feature probe needs a synthetic dataset with ground truth; '{dataset}' has none")
    rows = {split: split_images(dataset, split).to_pylist() for split in ("train", "test")}
    captioner, _, fingerprint = load_run(dataset, prepare_untrained(dataset, like, manifest).name)
    cache = study_dir(dataset) / "feature_probe.json"
    key = hashlib.sha256(json.dumps([fingerprint, {s: [r["sha256"] for r in rs] for s, rs in rows.items()}])
                         .encode()).hexdigest()[:16]
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        return cached["probe"]
    root, features = image_root(dataset), {}
    with torch.no_grad():
        for split, split_rows in rows.items():
            pooled_rows = []
            for r in split_rows:
                entry = truth[r["image_id"]]
                prompt = captioner.prepare(open_rgb(safe_join(root, r["path"])), None)
                image = captioner.image_inputs([prompt], None, None)["mm_encoder_outputs"]["image"]
                tokens = image.pooler_output.float().cpu()  # [tiles, N, D]
                if tokens.shape[0] != 1:
                    raise ValueError("the feature probe reads one tile per image (the demo's --max-tiles 1)")
                side = int(round(tokens.shape[1] ** 0.5))
                with Image.open(entry["mask"]) as mask, Image.open(entry["subject_labels"]) as labels:
                    weights = pooling_weights(mask, labels, moved_subject(entry), side)
                pooled_rows.append(pooled(tokens[0], weights))  # [P, D]
            features[split] = np.stack(pooled_rows)  # [n, P, D]
    labels = {s: {k: np.array([truth[r["image_id"]]["attributes"][k] for r in rs]) for k in SUBJECT_ATTRIBUTES}
              for s, rs in rows.items()}
    per_attribute = {p: {k: float((linear_probe(features["train"][:, j], labels["train"][k], features["test"][:, j])
                                   == labels["test"][k]).mean()) for k in SUBJECT_ATTRIBUTES}
                     for j, p in enumerate(POOLINGS)}
    constant = majority_values([truth[r["image_id"]]["attributes"] for r in rows["train"]])
    majority = {k: float((labels["test"][k] == constant[k]).mean()) for k in SUBJECT_ATTRIBUTES}
    probe = {"per_attribute": per_attribute, "majority": majority,
             "mean": {p: float(np.mean(list(v.values()))) for p, v in per_attribute.items()},
             "train_images": len(rows["train"]), "test_images": len(rows["test"])}
    write_json_atomic(cache, {"key": key, "probe": probe})
    return probe
