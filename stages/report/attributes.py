"""Ground-truth scoring of critiques on the synthetic corpus: which attribute values a critique asserts
(read with the generator's own phrase bank) against the image's true attributes.

Per attribute a, over the images of a split:
- precision_a = correct assertions about a / all assertions about a (0 when a is never mentioned: a critic who
  never speaks about an attribute gets no credit for it; a critique may assert two values of a, one is then wrong)
- recall_a = images whose critique asserts a's true value / images
- kappa_a = Cohen's kappa between the asserted and the true value over the images whose critique asserts exactly
  one value of a (None when fewer than two such images or when chance agreement is 1): a critique that always
  claims the same value scores 0 however often that value is right
``macro_precision`` / ``macro_recall`` average them over the six attributes, ``macro_kappa`` over the attributes
where kappa is defined.

The best constant critique is the baseline every model must beat: of the critique that asserts the training
split's most frequent value of every attribute and each training reference, the one with the highest macro
precision on the training split, used unchanged for every test image.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Hashable

from stages.synthetic.attributes import ATTRIBUTES, asserted_values, critique_of

Truth = dict[str, str]  # attribute -> true value


def cohen_kappa(pairs: list[tuple[str, str]], values: tuple[str, ...]) -> float | None:
    """Cohen's kappa of (claimed, true) value pairs: (p_o - p_e) / (1 - p_e); None when undefined."""
    n = len(pairs)
    if n < 2:
        return None
    observed = sum(claimed == true for claimed, true in pairs) / n
    claimed, true = Counter(c for c, _ in pairs), Counter(t for _, t in pairs)
    chance = sum(claimed[v] * true[v] for v in values) / (n * n)
    return None if chance == 1 else (observed - chance) / (1 - chance)


def attribute_scores(captions: dict[Hashable, str], truth: dict[Hashable, Truth]) -> dict[str, float | None]:
    """``precision_<a>``, ``recall_<a>`` per attribute and their macro averages over the images of ``captions``."""
    if not captions:
        raise ValueError("no captions to score")
    missing = [i for i in captions if i not in truth]
    if missing:
        raise ValueError(f"{len(missing)} image(s) without ground-truth attributes, e.g. {missing[:3]}")
    asserted = {i: asserted_values(c) for i, c in captions.items()}
    out: dict[str, float] = {}
    for key in ATTRIBUTES:
        said = [(asserted[i].get(key, set()), truth[i][key]) for i in captions]
        claims = sum(len(values) for values, _ in said)
        hits = sum(true in values for values, true in said)
        out[f"precision_{key}"] = hits / claims if claims else 0.0
        out[f"recall_{key}"] = hits / len(said)
        out[f"kappa_{key}"] = cohen_kappa([(next(iter(v)), true) for v, true in said if len(v) == 1], ATTRIBUTES[key])
    kappas = [out[f"kappa_{k}"] for k in ATTRIBUTES if out[f"kappa_{k}"] is not None]
    out["macro_kappa"] = sum(kappas) / len(kappas) if kappas else None
    out["macro_precision"] = sum(out[f"precision_{k}"] for k in ATTRIBUTES) / len(ATTRIBUTES)
    out["macro_recall"] = sum(out[f"recall_{k}"] for k in ATTRIBUTES) / len(ATTRIBUTES)
    return out


def majority_values(train_truth: list[Truth]) -> Truth:
    """Each attribute's most frequent training value (ties: the first listed value): the best constant answer."""
    def majority(key: str) -> str:
        counts = Counter(t[key] for t in train_truth)
        return max(ATTRIBUTES[key], key=lambda v: (counts[v], -ATTRIBUTES[key].index(v)))

    return {key: majority(key) for key in ATTRIBUTES}


def majority_critique(train_truth: list[Truth]) -> str:
    """The critique asserting each attribute's most frequent training value."""
    return critique_of(majority_values(train_truth))


def best_constant_critique(train_truth: dict[Hashable, Truth], train_references: list[str]) -> str:
    """The constant critique with the highest macro precision on the training split (see the module docstring)."""
    if not train_truth:
        raise ValueError("no training images to choose a constant critique on")
    n = len(train_truth)
    share = {key: Counter(t[key] for t in train_truth.values()) for key in ATTRIBUTES}
    candidates = [majority_critique(list(train_truth.values())), *dict.fromkeys(train_references)]

    def macro_precision(text: str) -> float:  # a constant's precision on a is the mean share of the values it asserts
        said = asserted_values(text)
        return sum(sum(share[k][v] for v in said[k]) / (n * len(said[k])) for k in said) / len(ATTRIBUTES)

    return max(candidates, key=macro_precision)  # max keeps the first of equals: the majority critique


@dataclass(frozen=True)
class AttributeTruth:
    values: dict[str, dict[str, str]]  # image_id -> attribute -> true value, of the split
    constant: str  # the best constant critique (chosen on the training split)
    majority: Truth  # the training split's most frequent value of each attribute (the best constant forced choice)


def attribute_truth(dataset: str, split: str) -> AttributeTruth | None:
    """Ground-truth attributes of a synthetic dataset's split and its best constant critique; None for real data."""
    from stages.synthetic.truth import ground_truth
    from stages.report.references import references

    truth = ground_truth(dataset)
    if truth is None:
        return None
    train_refs = references(dataset, "train")
    train = {i: truth[i]["attributes"] for i in train_refs}
    constant = best_constant_critique(train, [r for i in sorted(train_refs) for r in train_refs[i]])
    ids = references(dataset, split)
    return AttributeTruth({i: truth[i]["attributes"] for i in ids}, constant, majority_values(list(train.values())))
