"""The feature probe's parts against oracles: scikit-learn's logistic regression, hand-made pooling weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


def test_linear_probe_predicts_like_scikit_learn() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from stages.report.feature_probe import linear_probe

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 12)) * 1.5
    y = rng.integers(3, size=600)
    x = centres[y] + rng.normal(size=(600, 12))  # three overlapping classes
    labels = np.array(["under", "balanced", "blown"])[y]
    ours = linear_probe(x[:400], labels[:400], x[400:], l2=1e-2)
    scaler = StandardScaler().fit(x[:400])
    # sklearn's C is 1 / (2 * n * l2) for the mean loss + l2 |W|^2 that linear_probe minimises
    theirs = LogisticRegression(C=1 / (2 * 400 * 1e-2), max_iter=5000).fit(scaler.transform(x[:400]), labels[:400])
    expected = theirs.predict(scaler.transform(x[400:]))
    assert (ours == expected).mean() >= 0.97
    assert (ours == labels[400:]).mean() > 0.8  # and it learns: three chance-level classes would give 1/3


def test_pooling_weights_and_means() -> None:
    from stages.report.feature_probe import pooled, pooling_weights

    mask = np.zeros((40, 40), np.uint8)
    mask[:20, :20] = 255  # the top-left quarter: token (0, 0) of a 2 x 2 grid
    labels = np.zeros((40, 40), np.uint8)
    labels[20:, 20:] = 3  # subject 2 (label 3) in the bottom-right quarter
    weights = pooling_weights(Image.fromarray(mask), Image.fromarray(labels), other=2, side=2)
    assert weights.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]]
    tokens = torch.arange(8, dtype=torch.float32).view(4, 2)  # [N, D]
    means = pooled(tokens, np.vstack([weights, np.zeros((1, 4), np.float32)]))
    assert means.tolist() == [[0, 1], [3, 4], [6, 7], [3, 4]]  # an empty pooling falls back to the even mean
    with pytest.raises(RuntimeError):  # weights for 3 tokens, 4 tokens given
        pooled(tokens, np.ones((1, 3), np.float32))
