"""Retrieval baselines: training-set critiques given to test images, scored like any model.

- **consensus**: every test image gets the same training comment, the one with the highest mean
  TF-IDF cosine similarity to all other training comments (the corpus "medoid"). TF-IDF cosine
  rather than CIDEr-D against a sample: with L2-normalised rows the mean similarity of comment i
  to the others is ``(v_i · Σ_j v_j − v_i · v_i) / (N − 1)``, so it is exact over the whole
  training set in one sparse product (O(total tokens)), needs no JVM and no sampling.
- **nearest image**: each test image gets a comment of its nearest training image. Features are
  deliberately simple and honest: a "tiny image" (mean RGB of a 4×4 grid, in [0, 1], divided
  by 48 so its L1 distances lie in [0, 1]; unlike a hard colour histogram it degrades smoothly
  with small colour shifts) plus, when saliency maps are given, the map pooled to 7×7 and
  L1-normalised (L1 distance in [0, 2]). Nearest = smallest L1 distance. Of the neighbour's
  comments the most central one (same score as above) is used.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Hashable

import numpy as np
from scipy import sparse

_WORD = re.compile(r"[a-z0-9']+")


def tfidf(texts: list[str]) -> sparse.csr_matrix:
    """Rows = texts, L2-normalised TF-IDF (raw counts × smoothed idf ``ln((1+N)/(1+df)) + 1``)."""
    vocab: dict[str, int] = {}
    rows, cols, vals = [], [], []
    for r, text in enumerate(texts):
        for word, count in Counter(_WORD.findall(text.lower())).items():
            rows.append(r)
            cols.append(vocab.setdefault(word, len(vocab)))
            vals.append(count)
    m = sparse.csr_matrix((vals, (rows, cols)), shape=(len(texts), len(vocab)), dtype=np.float64)
    df = np.bincount(m.indices, minlength=len(vocab))
    m = m @ sparse.diags(np.log((1 + len(texts)) / (1 + df)) + 1)
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1))).ravel()
    return sparse.csr_matrix(sparse.diags(1 / np.where(norms > 0, norms, 1)) @ m)


def centrality(texts: list[str]) -> np.ndarray:
    """Mean cosine similarity of each text to every other text, [N]."""
    if len(texts) < 2:
        return np.zeros(len(texts))
    v = tfidf(texts)
    total = np.asarray(v.sum(axis=0)).ravel()  # Σ_j v_j
    self_sim = np.asarray(v.multiply(v).sum(axis=1)).ravel()  # 1, or 0 for texts without words
    return (v @ total - self_sim) / (len(texts) - 1)


def consensus_baseline(train_texts: list[str], test_ids: list[Hashable]) -> dict[Hashable, str]:
    """The single most central training comment, for every test image."""
    best = train_texts[int(np.argmax(centrality(train_texts)))]
    return {i: best for i in test_ids}


def image_features(path: Path, saliency: np.ndarray | None = None) -> np.ndarray:
    """Tiny image (4×4 grid mean RGB / 255 / 48) + 7×7 pooled, L1-normalised saliency map when given."""
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", (64, 64))
        tiny = np.asarray(img.convert("RGB").resize((4, 4), Image.BOX), dtype=np.float64)  # [4, 4, 3]
    parts = [tiny.ravel() / 255 / tiny.size]
    if saliency is not None:
        pooled = np.asarray(Image.fromarray(np.asarray(saliency, np.float32)).resize((7, 7), Image.BILINEAR))
        pooled = np.clip(pooled, 0, None).ravel()
        parts.append(pooled / pooled.sum() if pooled.sum() > 0 else np.full(49, 1 / 49))
    return np.concatenate(parts)


def nearest_image_baseline(
    train_features: dict[Hashable, np.ndarray],
    train_comments: dict[Hashable, list[str]],
    test_features: dict[Hashable, np.ndarray],
) -> dict[Hashable, str]:
    """Each test image gets the most central comment of its nearest training image (L1 on features)."""
    ids = [i for i in train_features if train_comments.get(i)]
    feats = np.stack([train_features[i] for i in ids])  # [N_train, D]
    flat = [(i, t) for i in ids for t in train_comments[i]]
    score = centrality([t for _, t in flat])
    best: dict[Hashable, tuple[float, str]] = {}
    for (i, text), s in zip(flat, score):
        if i not in best or s > best[i][0]:
            best[i] = (s, text)
    out = {}
    for test_id, f in test_features.items():
        nearest = ids[int(np.argmin(np.abs(feats - f).sum(axis=1)))]
        out[test_id] = best[nearest][1]
    return out


def retrieval_baselines(
    dataset: str,
    test_split: str = "test",
    train_split: str = "train",
    saliency: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, str]]:
    """Both baselines for ``dataset``'s canonical tables: {"retrieval: consensus" | "retrieval: nearest image": captions}.

    ``saliency`` (image_id -> raw map) adds the saliency part to the nearest-image features."""
    from tqdm import tqdm

    from storage.tables import image_root, read_table

    images = read_table(dataset, "images").to_pylist()
    comments: dict[str, list[str]] = {}
    for row in read_table(dataset, "comments").select(["image_id", "text"]).to_pylist():
        comments.setdefault(row["image_id"], []).append(row["text"])
    train = [r for r in images if r["split"] == train_split and comments.get(r["image_id"])]
    test = [r for r in images if r["split"] == test_split]
    if not train or not test:
        raise ValueError(f"{dataset}: need images in splits '{train_split}' and '{test_split}' "
                         f"(found {len(train)} train with comments, {len(test)} test)")
    root = image_root(dataset)
    sal = saliency or {}

    def features(rows: list[dict], desc: str) -> dict[str, np.ndarray]:
        uniform = np.ones((7, 7), np.float32)  # an image without a map gets a flat one
        return {r["image_id"]: image_features(root / r["path"], sal.get(r["image_id"], uniform) if saliency else None)
                for r in tqdm(rows, desc=desc, unit="img")}

    train_texts = [t for r in train for t in comments[r["image_id"]]]
    return {
        "retrieval: consensus": consensus_baseline(train_texts, [r["image_id"] for r in test]),
        "retrieval: nearest image": nearest_image_baseline(
            features(train, f"{dataset} train features"),
            {r["image_id"]: comments[r["image_id"]] for r in train},
            features(test, f"{dataset} test features"),
        ),
    }
