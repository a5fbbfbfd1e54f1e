"""Forced-choice attribute accuracy on the synthetic corpus: which value of each attribute a captioner finds
likeliest to say about an image.

Generated text can dodge an attribute (say nothing of it) or claim one value for every image; a forced choice
cannot. Every phrasing of every value in the phrase bank is scored as the critique's opening sentence by the
captioner's mean per-token log-likelihood, given the image and its map. Each phrasing's score is then centred
on its mean over the images being scored (no labels are used): what the image adds to the model's prior for
that wording. A value's score is the mean of its phrasings'; the highest is the model's answer. (Uncentred,
the wording prior decides: the fine-tuned demo runs then give one answer per attribute for every image.)
Per attribute: accuracy against the generator's truth and Cohen's kappa. ``accuracy`` averages the aesthetic
subject's attributes (``SUBJECT_ATTRIBUTES``: what the map is for), ``global_accuracy`` the global ones
(horizon, noise), reported apart; ``chance`` is one over the number of values, averaged like ``accuracy``.

Mask following (:func:`mask_following`): with the true mask moved onto another subject, the share of the
aesthetic-subject choices that describe that subject, where its value differs from the aesthetic subject's.
"""
from __future__ import annotations

from typing import Any, Hashable

import numpy as np

from stages.report.attributes import Truth, cohen_kappa
from stages.synthetic.attributes import ATTRIBUTES, GLOBAL_ATTRIBUTES, PHRASES, SUBJECT_ATTRIBUTES

Candidates = dict[str, dict[str, list[list[int]]]]  # attribute -> value -> token ids of each phrasing


def candidates(tokenizer: Any, keys: tuple[str, ...] = tuple(ATTRIBUTES)) -> Candidates:
    """Every value's phrasings of the attributes ``keys`` as opening sentences ("Nice use of the rule of
    thirds."), tokenized."""
    def ids(phrase: str) -> list[int]:
        return tokenizer(phrase[0].upper() + phrase[1:] + ".", add_special_tokens=False)["input_ids"]

    return {key: {value: [ids(p) for p in PHRASES[key][value]] for value in ATTRIBUTES[key]} for key in keys}


def _flat(cands: Candidates) -> list[tuple[str, str, list[int]]]:
    return [(key, value, ids) for key, values in cands.items()
            for value, phrasings in values.items() for ids in phrasings]


def phrasing_logprobs(captioner: Any, prompt: Any, cands: Candidates) -> np.ndarray:
    """[K] mean token log-likelihood of every phrasing (in ``_flat`` order) after ``prompt``."""
    return captioner.continuation_logprobs(prompt, [ids for _, _, ids in _flat(cands)]).numpy()


def forced_choices(logprobs: dict[Hashable, np.ndarray], cands: Candidates,
                   prior: np.ndarray | None = None) -> dict[Hashable, dict[str, str]]:
    """image -> attribute -> chosen value, from every image's :func:`phrasing_logprobs`, centred on ``prior`` ([K];
    default: their mean over these images)."""
    ids = list(logprobs)
    centred = np.stack([logprobs[i] for i in ids])  # [N, K]
    centred = centred - (centred.mean(0) if prior is None else prior)
    flat = _flat(cands)
    choices: dict[Hashable, dict[str, str]] = {i: {} for i in ids}
    for key, values in cands.items():
        score = np.stack([centred[:, [j for j, (k, v, _) in enumerate(flat) if k == key and v == value]].mean(1)
                          for value in values], axis=1)  # [N, values]
        for i, best in zip(ids, score.argmax(1)):
            choices[i][key] = list(values)[best]
    return choices


def forced_choice_scores(choices: dict[Hashable, dict[str, str]], truth: dict[Hashable, Truth]) -> dict[str, Any]:
    """Accuracy and kappa per attribute of the chosen values against the truth; the means over the aesthetic
    subject's attributes (``accuracy``, with its ``chance``) and over the global ones."""
    if not choices:
        raise ValueError("no forced choices to score")
    keys = list(next(iter(choices.values())))
    per_attribute, kappa = {}, {}
    for key in keys:
        pairs = [(choices[i][key], truth[i][key]) for i in choices]
        per_attribute[key] = sum(c == t for c, t in pairs) / len(pairs)
        kappa[key] = cohen_kappa(pairs, ATTRIBUTES[key])
    subject = [k for k in keys if k in SUBJECT_ATTRIBUTES]
    global_ = [k for k in keys if k in GLOBAL_ATTRIBUTES]
    return {"accuracy": float(np.mean([per_attribute[k] for k in subject])),
            "global_accuracy": float(np.mean([per_attribute[k] for k in global_])) if global_ else None,
            "per_attribute": per_attribute, "kappa": kappa,
            "chance": float(np.mean([1 / len(ATTRIBUTES[k]) for k in subject])), "n": len(choices)}


def correct(choices: dict[Hashable, dict[str, str]], truth: dict[Hashable, Truth]) -> dict[Hashable, float]:
    """image -> share of its aesthetic-subject attributes chosen right (the per-image outcome paired statistics
    compare)."""
    return {i: float(np.mean([c[k] == truth[i][k] for k in c if k in SUBJECT_ATTRIBUTES])) for i, c in choices.items()}


def mask_following(choices: dict[Hashable, dict[str, str]], entries: dict[Hashable, dict]) -> dict[str, Any]:
    """How often choices made with the mask moved onto another subject (``truth.moved_subject``) describe that
    subject: over (image, aesthetic-subject attribute) pairs whose moved-to value differs from the aesthetic
    subject's, the share choosing the moved-to value (``rate``) or the aesthetic one (``stayed``). ``chance``:
    the rate of a model that describes a subject picked uniformly at random (each subject's true value).
    ``per_attribute``: the same per attribute. ``entries``: image -> ``truth.ground_truth`` entry."""
    from stages.synthetic.truth import moved_subject

    # attribute -> (followed, stayed, chance) per counted image
    pairs: dict[str, list[tuple[bool, bool, float]]] = {key: [] for key in SUBJECT_ATTRIBUTES}
    for i, chosen in choices.items():
        entry = entries[i]
        subjects = entry["subjects"]
        moved, aesthetic = subjects[moved_subject(entry)], subjects[entry["aesthetic"]]
        for key in SUBJECT_ATTRIBUTES:
            if key in chosen and moved[key] != aesthetic[key]:
                pairs[key].append((chosen[key] == moved[key], chosen[key] == aesthetic[key],
                                   sum(s[key] == moved[key] for s in subjects) / len(subjects)))

    def rates(rows: list[tuple[bool, bool, float]]) -> dict[str, Any]:
        followed, stayed, chance = np.array(rows, dtype=float).T
        return {"rate": float(followed.mean()), "stayed": float(stayed.mean()), "chance": float(chance.mean()),
                "n": len(rows)}

    every = [row for rows in pairs.values() for row in rows]
    if not every:
        raise ValueError("no attribute where the moved-to subject differs from the aesthetic one")
    return {**rates(every), "per_attribute": {key: rates(rows) for key, rows in pairs.items() if rows}}


def image_logprobs(captioner: Any, images: list[tuple[Hashable, Any, Any]], progress: bool = False,
                   desc: str = "forced choice") -> dict[Hashable, np.ndarray]:
    """image -> :func:`phrasing_logprobs` for ``(image_id, PIL image, raw map or None)`` triples."""
    from tqdm import tqdm

    cands = candidates(captioner.tokenizer)
    return {i: phrasing_logprobs(captioner, captioner.prepare(img, saliency), cands)
            for i, img, saliency in tqdm(images, desc=desc, unit="img", disable=not progress)}


def choose_for_images(captioner: Any, images: list[tuple[Hashable, Any, Any]], progress: bool = False,
                      desc: str = "forced choice") -> dict[Hashable, dict[str, str]]:
    """image -> attribute -> chosen value for ``(image_id, PIL image, raw map or None)`` triples."""
    return forced_choices(image_logprobs(captioner, images, progress, desc), candidates(captioner.tokenizer))


def run_choices(dataset: str, run: str, manifest: Any, split: str, ids: set[Hashable] | None = None,
                checkpoint: str | None = None, progress: bool = False,
                source: str | None = None) -> tuple[dict[Hashable, dict[str, str]], str]:
    """(forced choices, checkpoint fingerprint) of a run on the ``split`` images in ``ids`` (all when None), each
    with its own saliency map from the run's source (or ``source``: stages/finetune/saliency_source.py), as
    generation uses them."""
    from pipeline.paths import runs_dir
    from stages.report.generate import load_run, run_config, run_saliency, split_images
    from storage.images import open_rgb, safe_join
    from storage.tables import image_root

    captioner, _, fingerprint = load_run(dataset, run, checkpoint)
    run_cfg = run_config(runs_dir(dataset) / run)
    if source is not None:
        run_cfg = {**run_cfg, "saliency": source}
    store = run_saliency(dataset, run_cfg, manifest) if captioner.needs_saliency else None
    root = image_root(dataset)
    rows = [r for r in split_images(dataset, split).to_pylist() if ids is None or r["image_id"] in ids]
    images = [(r["image_id"], open_rgb(safe_join(root, r["path"])),
               store.read(r["sha256"])[0] if store is not None and store.has(r["sha256"]) else None) for r in rows]
    return choose_for_images(captioner, images, progress, f"forced choice {run}"), fingerprint
