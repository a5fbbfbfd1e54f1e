"""The feature probe's parts against oracles: known signals, scikit-learn's own validation scores, hand-made pooling
weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


def test_linear_probe_reads_a_known_signal_and_chooses_its_regularisation_on_validation() -> None:
    """Three overlapping classes in 12 dimensions, 200 of them noise: the reader finds the classes on the test split
    far above chance, and the C it keeps is the one reading the validation split best (scikit-learn's own scores
    of each candidate, refit here, are the oracle)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from stages.report.feature_probe import CS, linear_probe

    rng = np.random.default_rng(0)
    centres = np.concatenate([rng.normal(size=(3, 12)) * 1.5, np.zeros((3, 200))], axis=1)
    y = np.array(["under", "balanced", "blown"])[rng.integers(3, size=900)]
    x = centres[np.searchsorted(["balanced", "blown", "under"], y)] + rng.normal(size=(900, 212))
    splits = {"train": slice(0, 300), "validation": slice(300, 600), "test": slice(600, 900)}
    accuracy, chosen = linear_probe({s: x[i] for s, i in splits.items()}, {s: y[i] for s, i in splits.items()})
    assert accuracy > 0.7  # three chance-level classes would give 1/3
    scores = [make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x[:300], y[:300])
              .score(x[300:600], y[300:600]) for c in CS]
    assert chosen == CS[int(np.argmax(scores))]


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
