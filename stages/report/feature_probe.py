"""How much of the aesthetic subject the base's image tokens already hold: the study's ceiling for a map.

The frozen base (the model the study's runs were fine-tuned from, no fusion) turns each image into one tile's grid
of LLM tokens [N, D]. They are read four ways: pooled by the true mask (what a perfect map selects), evenly pooled
(no map), pooled over the silhouette of the subject a moved mask marks (``truth.moved_subject``: the wrong subject),
and all N tokens side by side (what the LLM itself sees, without a map). Per attribute of the aesthetic subject, a
multinomial logistic regression (scikit-learn's, on standardised features) is fit on the train split with each L2
strength of ``CS``, the strength reading the validation split best is kept, and that reader is scored on the test
split against the generator's truth. A linear reader of the mask-pooled tokens far above the others means the base
sees the attribute and selection is what the map must add; a reader at the majority rate either way means no map
can help with it.
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

PROBE_VERSION = 2  # of what the probe computes (2: scikit-learn, C chosen on validation, all tokens)
POOLINGS = ("true_mask", "even", "other_subject")  # weighted means of the tokens; then "all_tokens"
READERS = (*POOLINGS, "all_tokens")
CS = (0.01, 0.1, 1.0)  # scikit-learn's inverse L2 strengths, chosen among on the validation split
SPLITS = ("train", "validation", "test")


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


def linear_probe(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> tuple[float, float]:
    """(test accuracy, chosen C) of a multinomial logistic regression on standardised features, fit on ``x["train"]``
    with each C of ``CS``, the one best on ``x["validation"]`` kept (ties: the stronger regularisation)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best: tuple[float, float, object] | None = None
    for c in CS:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x["train"], y["train"])
        score = model.score(x["validation"], y["validation"])
        if best is None or score > best[0]:
            best = (score, c, model)
    _, c, model = best
    return float(model.score(x["test"], y["test"])), c


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
    rows = {split: split_images(dataset, split).to_pylist() for split in SPLITS}
    captioner, _, fingerprint = load_run(dataset, prepare_untrained(dataset, like, manifest).name)
    cache = study_dir(dataset) / "feature_probe.json"
    key = hashlib.sha256(json.dumps([PROBE_VERSION, fingerprint, {s: [r["sha256"] for r in rs] for s, rs in rows.items()}])
                         .encode()).hexdigest()[:16]
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        return cached["probe"]
    root, features = image_root(dataset), {}
    with torch.no_grad():
        for split, split_rows in rows.items():
            pooled_rows, flat_rows = [], []
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
                flat_rows.append(tokens[0].flatten().numpy())  # [N * D]
            features[split] = {**{p: np.stack(pooled_rows)[:, j] for j, p in enumerate(POOLINGS)},
                               "all_tokens": np.stack(flat_rows)}
    labels = {s: {k: np.array([truth[r["image_id"]]["attributes"][k] for r in rs]) for k in SUBJECT_ATTRIBUTES}
              for s, rs in rows.items()}
    fits = {p: {k: linear_probe({s: features[s][p] for s in SPLITS}, {s: labels[s][k] for s in SPLITS})
                for k in SUBJECT_ATTRIBUTES} for p in READERS}
    constant = majority_values([truth[r["image_id"]]["attributes"] for r in rows["train"]])
    majority = {k: float((labels["test"][k] == constant[k]).mean()) for k in SUBJECT_ATTRIBUTES}
    per_attribute = {p: {k: accuracy for k, (accuracy, _) in v.items()} for p, v in fits.items()}
    probe = {"per_attribute": per_attribute, "chosen_c": {p: {k: c for k, (_, c) in v.items()} for p, v in fits.items()},
             "majority": majority, "mean": {p: float(np.mean(list(v.values()))) for p, v in per_attribute.items()},
             "train_images": len(rows["train"]), "validation_images": len(rows["validation"]),
             "test_images": len(rows["test"])}
    write_json_atomic(cache, {"key": key, "probe": probe})
    return probe
