"""The rungs beneath the saliency study's top line, each measured on a synthetic dataset's split against the
generator's truth, so that where the top fails the rung that broke shows:

- R1 reading (:func:`base_reading`): the base, asked to describe the scene, names each subject's placement,
  exposure, colour and focus right (every subject, left to right, one sentence each);
- R2 naming (:func:`named_oracle`): the base's forced choices on the aesthetic subject's attributes when the
  prompt names that subject by its position ("Critique the left subject."): what a perfect selection would give;
- R3 selecting: the study's arms (stages/report/study.py);
- R4 finding (:func:`eat_subject_preference`): how much more of the EAT's saliency falls on the aesthetic subject
  than on the others (1 = no preference).

Each is cached beside the study's scores (``ladder.json`` in the dataset's reports) while the model and the images
are unchanged.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.manifest import Manifest
from pipeline.paths import reports_dir
from stages.synthetic.attributes import (CRITIQUE_PROMPT, DESCRIBE_PROMPT, POSITIONS, SUBJECT_ATTRIBUTES,
                                         described_subjects, left_to_right)
from storage.atomic import write_json_atomic


def _cached(dataset: str, rung: str, key_parts: Any, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``, or its value kept in ``reports/<dataset>/ladder.json`` under ``rung`` for these key parts."""
    path: Path = reports_dir(dataset) / "ladder.json"
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
    cached = json.loads(path.read_text()) if path.exists() else {}
    if cached.get(rung, {}).get("key") == key:
        return cached[rung]["value"]
    value = compute()
    cached = json.loads(path.read_text()) if path.exists() else {}  # another rung may have been written meanwhile
    write_json_atomic(path, {**cached, rung: {"key": key, "value": value}})
    return value


def _rows(dataset: str, split: str) -> list[dict[str, Any]]:
    from stages.report.generate import split_images

    return split_images(dataset, split).to_pylist()


def _base(dataset: str, like: str, manifest: Manifest | None) -> tuple[Any, str]:
    """(captioner, fingerprint) of the model the run ``like`` was fine-tuned from."""
    from stages.report.generate import load_run, prepare_untrained

    captioner, _, fingerprint = load_run(dataset, prepare_untrained(dataset, like, manifest).name)
    return captioner, fingerprint


def base_reading(dataset: str, like: str, manifest: Manifest | None, split: str = "test",
                 batch_size: int = 16) -> dict[str, Any]:
    """R1: {attribute: share of (image, subject) pairs whose description sentence names the subject's true value and
    only it} for the base of run ``like``, asked ``DESCRIBE_PROMPT`` about each ``split`` image (greedy), plus
    ``mean`` and ``images``."""
    from stages.families.captioner import DecodeConfig
    from stages.synthetic.truth import ground_truth
    from storage.images import open_rgb, safe_join
    from storage.tables import image_root

    truth, rows = ground_truth(dataset), _rows(dataset, split)
    captioner, fingerprint = _base(dataset, like, manifest)

    def compute() -> dict[str, Any]:
        root, texts = image_root(dataset), []
        decode = DecodeConfig(max_new_tokens=200)
        for i in range(0, len(rows), batch_size):
            prompts = [captioner.prepare(open_rgb(safe_join(root, r["path"])), None, DESCRIBE_PROMPT)
                       for r in rows[i:i + batch_size]]
            texts += captioner.generate(prompts, decode)
        hits: dict[str, list[bool]] = {k: [] for k in SUBJECT_ATTRIBUTES}
        for text, r in zip(texts, rows):
            entry = truth[r["image_id"]]
            named = described_subjects(text) + [{}] * len(POSITIONS)
            for rank, k in enumerate(left_to_right(entry["scene"])):
                for key in SUBJECT_ATTRIBUTES:
                    hits[key].append(named[rank].get(key) == {entry["subjects"][k][key]})
        reading = {k: float(np.mean(v)) for k, v in hits.items()}
        return {**reading, "mean": float(np.mean(list(reading.values()))), "images": len(rows),
                "example": texts[0] if texts else ""}

    return _cached(dataset, "base_reading", [fingerprint, split, [r["sha256"] for r in rows]], compute)


def named_prompt(entry: dict[str, Any]) -> str:
    """The critique prompt that names an image's aesthetic subject by its left-to-right position."""
    return CRITIQUE_PROMPT.format(POSITIONS[left_to_right(entry["scene"]).index(entry["aesthetic"])])


def other_subjects(choices: dict[str, dict[str, str]], truth: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{attribute: how often the choices made about each image's aesthetic subject match the values of its other
    subjects} (mean over them): near the named accuracy, the critique reads no subject in particular; above it,
    the critique reads another subject than the one named."""
    hits: dict[str, list[bool]] = {k: [] for k in SUBJECT_ATTRIBUTES}
    for i, chosen in choices.items():
        entry = truth[i]
        for k, subject in enumerate(entry["subjects"]):
            if k != entry["aesthetic"]:
                for key in SUBJECT_ATTRIBUTES:
                    hits[key].append(chosen[key] == subject[key])
    return {k: float(np.mean(v)) for k, v in hits.items()}


def named_oracle(dataset: str, like: str, manifest: Manifest | None, split: str = "test") -> dict[str, Any]:
    """R2: forced-choice scores (stages/report/forced_choice.py) of the base of run ``like`` on the aesthetic
    subject's attributes when each prompt names that subject (:func:`named_prompt`), centred on the validation
    split asked the same way, and the same choices against the other subjects (:func:`other_subjects`). Maps are
    uniform (the base reads none)."""
    from stages.report.attributes import attribute_truth
    from stages.report.forced_choice import candidates, forced_choice_scores, forced_choices, prior, split_logprobs
    from stages.synthetic.truth import ground_truth

    truth, rows = ground_truth(dataset), _rows(dataset, split)
    captioner, fingerprint = _base(dataset, like, manifest)

    def compute() -> dict[str, Any]:
        prompts = {i: named_prompt(e) for i, e in truth.items()}
        centre = prior(split_logprobs(captioner, dataset, "validation", None, prompts=prompts))
        choices = forced_choices(split_logprobs(captioner, dataset, split, None, prompts=prompts),
                                 candidates(captioner.tokenizer), centre)
        scores = forced_choice_scores(choices, attribute_truth(dataset, split).values)
        return {"accuracy": scores["accuracy"], "per_attribute": {k: v for k, v in scores["per_attribute"].items()
                                                                  if k in SUBJECT_ATTRIBUTES},
                "other_subjects": other_subjects(choices, truth), "images": len(rows)}

    validation = [r["sha256"] for r in _rows(dataset, "validation")]
    return _cached(dataset, "named_oracle", [fingerprint, split, [r["sha256"] for r in rows], validation], compute)


def eat_subject_preference(dataset: str, manifest: Manifest, split: str = "test") -> dict[str, Any]:
    """R4: the geometric mean over ``split`` images of the EAT map's mask ratio on the aesthetic subject's labelled
    silhouette over the mean of the other subjects' (``saliency.train_eat.subject_preference``), from the saliency
    store of the manifest's EAT, with the number of images counted (every subject visible at 224 px)."""
    import torch
    from PIL import Image

    from stages.saliency.train_eat import INPUT_SIZE, preference_of, subject_preference
    from stages.synthetic.truth import ground_truth
    from storage.saliency_store import find_store

    store, why = find_store(manifest)
    if store is None:
        raise FileNotFoundError(f"no saliency store ({why}): run `ase-mllm saliency --dataset {dataset}` first")
    truth, rows = ground_truth(dataset), _rows(dataset, split)
    ratios = []
    for r in rows:
        if not store.has(r["sha256"]):
            continue
        entry = truth[r["image_id"]]
        with Image.open(entry["subject_labels"]) as labels:
            small = np.array(labels.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.NEAREST))
        ratio = subject_preference(torch.as_tensor(store.read(r["sha256"])[0]), torch.from_numpy(small),
                                   entry["aesthetic"], len(entry["subjects"]))
        if ratio is not None:
            ratios.append(ratio)
    if not ratios:
        raise ValueError(f"no {split} image of '{dataset}' has a map with every subject visible")
    return {"preference": preference_of(ratios), "images": len(ratios)}


def ladder(dataset: str, like: str, manifest: Manifest, split: str = "test") -> dict[str, Any]:
    """R1, R2 and R4 on ``split`` for the base of run ``like`` and the manifest's EAT: {"base_reading": {attribute:
    accuracy}, "named_oracle": accuracy, "eat_subject_preference": ratio, "details": each rung's full result}."""
    reading = base_reading(dataset, like, manifest, split)
    named = named_oracle(dataset, like, manifest, split)
    finding = eat_subject_preference(dataset, manifest, split)
    return {"base_reading": {k: reading[k] for k in SUBJECT_ATTRIBUTES}, "named_oracle": named["accuracy"],
            "eat_subject_preference": finding["preference"],
            "details": {"base_reading": reading, "named_oracle": named, "eat_subject_preference": finding}}
