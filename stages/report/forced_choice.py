"""Forced-choice attribute accuracy on the synthetic corpus: which value of each attribute a captioner finds
likeliest to say about an image.

Generated text can dodge an attribute (say nothing of it) or claim one value for every image; a forced choice
cannot. Every phrasing of every value in the phrase bank is scored as the critique's opening sentence by the
captioner's mean per-token log-likelihood, given the image and its map. Each phrasing's score is then centred
on its mean over the run's validation split (no labels are used; never the images being scored): what the image
adds to the model's prior for that wording. A value's score is the mean of its phrasings'; the highest is the model's answer. (Uncentred,
the wording prior decides: the fine-tuned demo runs then give one answer per attribute for every image.)
Per attribute: accuracy against the generator's truth and Cohen's kappa. ``accuracy`` averages the aesthetic
subject's attributes (``SUBJECT_ATTRIBUTES``: what the map is for), ``global_accuracy`` the global ones
(horizon, noise), reported apart; ``chance`` is one over the number of values, averaged like ``accuracy``.

Mask following (:func:`mask_following`): with the true mask moved onto another subject, the share of the
aesthetic-subject choices that describe that subject, where its value differs from the aesthetic subject's, set
against the same run's own-mask choices scored on the moved subject's values (what ignoring the map scores).
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


UNPLACED = tuple(k for k in SUBJECT_ATTRIBUTES if k != "placement")  # what a mask's position cannot give away


def correct(choices: dict[Hashable, dict[str, str]], truth: dict[Hashable, Truth],
            keys: tuple[str, ...] = SUBJECT_ATTRIBUTES) -> dict[Hashable, float]:
    """image -> share of its attributes ``keys`` (default: the aesthetic subject's) chosen right (the per-image
    outcome paired statistics compare)."""
    return {i: float(np.mean([c[k] == truth[i][k] for k in keys if k in c])) for i, c in choices.items()}


def mask_following(moved: dict[Hashable, dict[str, str]], own: dict[Hashable, dict[str, str]],
                   entries: dict[Hashable, dict]) -> dict[str, Any]:
    """How often choices made with the true mask moved onto another subject (``truth.moved_subject``) describe that
    subject, against the same run's own-mask choices: over (image, aesthetic-subject attribute) pairs whose
    moved-to value differs from the aesthetic subject's, the share of moved-mask choices naming the moved-to value
    (``rate``), the share of own-mask choices that happen to name it (``baseline``: what ignoring the map scores),
    and the share of moved-mask choices still naming the aesthetic subject's value (``stayed``). ``per_attribute``:
    the same per attribute; ``per_image``: image -> [moved-to values named with the moved mask, with the own mask,
    pairs counted] (what paired statistics resample). ``entries``: image -> ``truth.ground_truth`` entry."""
    from stages.synthetic.truth import moved_subject

    rows: dict[str, list[tuple[bool, bool, bool]]] = {key: [] for key in SUBJECT_ATTRIBUTES}
    per_image: dict[Hashable, list[int]] = {}
    for i, chosen in moved.items():
        entry = entries[i]
        subjects = entry["subjects"]
        target, aesthetic = subjects[moved_subject(entry)], subjects[entry["aesthetic"]]
        counted = [key for key in SUBJECT_ATTRIBUTES if key in chosen and target[key] != aesthetic[key]]
        for key in counted:
            rows[key].append((chosen[key] == target[key], own[i][key] == target[key], chosen[key] == aesthetic[key]))
        if counted:
            per_image[i] = [sum(chosen[k] == target[k] for k in counted), sum(own[i][k] == target[k] for k in counted),
                            len(counted)]

    def rates(pairs: list[tuple[bool, bool, bool]]) -> dict[str, Any]:
        followed, baseline, stayed = np.array(pairs, dtype=float).T
        return {"rate": float(followed.mean()), "baseline": float(baseline.mean()), "stayed": float(stayed.mean()),
                "n": len(pairs)}

    every = [row for pairs in rows.values() for row in pairs]
    if not every:
        raise ValueError("no attribute where the moved-to subject differs from the aesthetic one")
    return {**rates(every), "per_attribute": {key: rates(pairs) for key, pairs in rows.items() if pairs},
            "per_image": per_image}


def image_logprobs(captioner: Any, images: list[tuple[Hashable, Any, Any]], progress: bool = False,
                   desc: str = "forced choice", prompts: dict[Hashable, str] | None = None) -> dict[Hashable, np.ndarray]:
    """image -> :func:`phrasing_logprobs` for ``(image_id, PIL image, raw map or None)`` triples, each after the
    captioner's aesthetic prompt or, where ``prompts`` has the image, after that prompt text."""
    from tqdm import tqdm

    cands = candidates(captioner.tokenizer)
    prompts = prompts or {}
    return {i: phrasing_logprobs(captioner, captioner.prepare(img, saliency, prompts.get(i)), cands)
            for i, img, saliency in tqdm(images, desc=desc, unit="img", disable=not progress)}


def split_logprobs(captioner: Any, dataset: str, split: str, store: Any | None, ids: set[Hashable] | None = None,
                   progress: bool = False, desc: str = "forced choice",
                   prompts: dict[Hashable, str] | None = None) -> dict[Hashable, np.ndarray]:
    """:func:`image_logprobs` of the ``split`` images in ``ids`` (all when None), each with its map from ``store``
    (a saliency source; None: uniform)."""
    from stages.report.generate import split_images
    from storage.images import open_rgb, safe_join
    from storage.tables import image_root

    root = image_root(dataset)
    rows = [r for r in split_images(dataset, split).to_pylist() if ids is None or r["image_id"] in ids]
    if not rows:
        raise ValueError(f"dataset '{dataset}' has no {split} images to make forced choices on")
    images = [(r["image_id"], open_rgb(safe_join(root, r["path"])),
               store.read(r["sha256"])[0] if store is not None and store.has(r["sha256"]) else None) for r in rows]
    return image_logprobs(captioner, images, progress, desc, prompts)


def prior(logprobs: dict[Hashable, np.ndarray]) -> np.ndarray:
    """[K] each phrasing's mean score over the images of ``logprobs`` (the centre of :func:`forced_choices`)."""
    return np.mean(list(logprobs.values()), axis=0)


def run_choices(dataset: str, run: str, manifest: Any, split: str, ids: set[Hashable] | None = None,
                checkpoint: str | None = None, progress: bool = False,
                sources: tuple[str | None, ...] = (None,)) -> tuple[list[dict[Hashable, dict[str, str]]], str]:
    """(forced choices per saliency source, checkpoint fingerprint) of a run on the ``split`` images in ``ids``
    (all when None). A source None is the run's own (stages/finetune/saliency_source.py), as generation uses it;
    every source's choices are centred on the run's validation split scored with its own maps."""
    from pipeline.paths import runs_dir
    from stages.report.generate import load_run, run_config, run_saliency

    captioner, _, fingerprint = load_run(dataset, run, checkpoint)
    run_cfg = run_config(runs_dir(dataset) / run)
    cands = candidates(captioner.tokenizer)

    def store(source: str | None) -> Any | None:
        if not captioner.needs_saliency:
            return None
        return run_saliency(dataset, run_cfg if source is None else {**run_cfg, "saliency": source}, manifest)

    validation = split_logprobs(captioner, dataset, "validation", store(None), None, progress,
                                f"forced choice {run} (validation)")

    def scored(source: str | None) -> dict[Hashable, np.ndarray]:
        if split == "validation" and source is None:
            return {i: v for i, v in validation.items() if ids is None or i in ids}
        return split_logprobs(captioner, dataset, split, store(source), ids, progress,
                              f"forced choice {run}" + (f" ({source} maps)" if source else ""))

    return [forced_choices(scored(source), cands, prior(validation)) for source in sources], fingerprint
