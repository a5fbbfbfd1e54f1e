"""Output diversity of a set of generated critiques: a model that says the same thing for every image shows here.

- ``distinct``: distinct critiques / images (1.0: every image got its own critique; 1/N: one constant critique)
- ``distinct_1`` / ``distinct_2``: distinct unigrams / bigrams over all unigrams / bigrams of the set (Li et al.,
  NAACL 2016), on lower-cased word tokens
- ``mean_length``: mean number of word tokens per critique
"""
from __future__ import annotations

import re
from typing import Hashable

DIVERSITY_KEYS = ("distinct", "distinct_1", "distinct_2", "mean_length")
_WORD = re.compile(r"[a-z0-9']+")


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def diversity(captions: dict[Hashable, str]) -> dict[str, float]:
    """The four diversity numbers of ``captions`` (image id -> critique)."""
    if not captions:
        raise ValueError("no captions to measure")
    tokens = [_WORD.findall(c.lower()) for c in captions.values()]
    out = {"distinct": len({" ".join(t) for t in tokens}) / len(tokens),
           "mean_length": sum(map(len, tokens)) / len(tokens)}
    for n in (1, 2):
        grams = [g for t in tokens for g in _ngrams(t, n)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    return {k: out[k] for k in DIVERSITY_KEYS}
