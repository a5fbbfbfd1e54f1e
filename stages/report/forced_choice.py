"""Forced-choice attribute accuracy on the synthetic corpus: which value of each attribute a captioner finds
likeliest to say about an image.

Generated text can dodge an attribute (say nothing of it) or claim one value for every image; a forced choice
cannot. For every attribute of an image, each candidate value is scored by the captioner's mean per-token
log-likelihood of its phrasings (the phrase bank's, each as the critique's opening sentence) given the image and
its map, averaged over the value's phrasings; the likeliest value is the model's answer. Per attribute:
accuracy against the generator's truth and Cohen's kappa; ``accuracy`` averages the attributes, ``chance``
is the accuracy of guessing uniformly (one over the number of values, averaged).
"""
from __future__ import annotations

from typing import Any, Hashable

import numpy as np

from stages.report.attributes import Truth, cohen_kappa
from stages.synthetic.attributes import ATTRIBUTES, PHRASES

Candidates = dict[str, dict[str, list[list[int]]]]  # attribute -> value -> token ids of each phrasing


def candidates(tokenizer: Any, keys: tuple[str, ...] = tuple(ATTRIBUTES)) -> Candidates:
    """Every value's phrasings of the attributes ``keys`` as opening sentences ("Nice use of the rule of
    thirds."), tokenized."""
    def ids(phrase: str) -> list[int]:
        return tokenizer(phrase[0].upper() + phrase[1:] + ".", add_special_tokens=False)["input_ids"]

    return {key: {value: [ids(p) for p in PHRASES[key][value]] for value in ATTRIBUTES[key]} for key in keys}


def choose(captioner: Any, prompt: Any, cands: Candidates) -> dict[str, str]:
    """attribute -> the value whose phrasings ``captioner`` finds likeliest after ``prompt`` (one batch per attribute)."""
    choice = {}
    for key, values in cands.items():
        flat = [(value, ids) for value, phrasings in values.items() for ids in phrasings]
        logp = captioner.continuation_logprobs(prompt, [ids for _, ids in flat]).numpy()  # [K]
        mean = {value: float(np.mean([lp for (v, _), lp in zip(flat, logp) if v == value])) for value in values}
        choice[key] = max(mean, key=mean.get)
    return choice


def forced_choice_scores(choices: dict[Hashable, dict[str, str]], truth: dict[Hashable, Truth]) -> dict[str, Any]:
    """Accuracy and kappa per attribute of the chosen values against the truth, their means and chance."""
    if not choices:
        raise ValueError("no forced choices to score")
    keys = list(next(iter(choices.values())))
    per_attribute, kappa = {}, {}
    for key in keys:
        pairs = [(choices[i][key], truth[i][key]) for i in choices]
        per_attribute[key] = sum(c == t for c, t in pairs) / len(pairs)
        kappa[key] = cohen_kappa(pairs, ATTRIBUTES[key])
    return {"accuracy": float(np.mean(list(per_attribute.values()))), "per_attribute": per_attribute,
            "kappa": kappa, "chance": float(np.mean([1 / len(ATTRIBUTES[k]) for k in keys])), "n": len(choices)}
