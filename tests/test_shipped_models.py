"""The demo's shipped starting weights: provenance sidecars that match, the layouts the pipeline loads, and
learning shown on held-out renders against the generator's ground truth (never our own recorded outputs)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from stages.synthetic.attributes import ATTRIBUTES
from stages.pretrain.commands import CORPUS_SEED
from stages.synthetic.pretraining_corpus import validation_set
from stages.pretrain.shipped import SHIPPED_BASE, SHIPPED_EAT, sidecar_path

HELD_OUT = 2_000_000  # renders used by neither pretraining nor its validation


@pytest.fixture(scope="module")
def renders() -> tuple[np.ndarray, list[dict]]:
    return validation_set(CORPUS_SEED, HELD_OUT, 48)


def test_sidecars_name_the_command_and_match_the_weights() -> None:
    for weights, sidecar in ((SHIPPED_EAT, sidecar_path(SHIPPED_EAT)),
                             (SHIPPED_BASE / "model.safetensors", SHIPPED_BASE / "pretraining.json")):
        info = json.loads(sidecar.read_text())
        assert info["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest(), weights
        assert info["command"].startswith("ase-mllm pretrain-demo") and info["corpus_seed"] == CORPUS_SEED
        assert info["generator_version"] >= 1 and info["validation"] and weights.stat().st_size <= 20 * 2**20


def test_shipped_eat_scores_and_looks_where_the_aesthetics_are(renders) -> None:
    """Held-out renders: predicted scores rank like the true ones, the LayerCAM maps concentrate inside the true
    aesthetic subject's mask (mask ratio 1 = a uniform map) and fall on the aesthetic subject far more than on the
    other two (subject preference 1 = none): it has learned to find the subject that matters."""
    from stages.pretrain.eat import evaluate
    from stages.saliency.eat import build_eat, load_eat_weights

    model = build_eat("small")
    load_eat_weights(model, SHIPPED_EAT)
    result = evaluate(model, *renders)
    assert result["srcc"] > 0.6 and result["mask_ratio"] > 4.0 and result["subject_preference"] > 3.0, result


def test_shipped_base_describes_and_critiques_unseen_images(renders) -> None:
    """A plain InternVL (only the new cross-attention keys missing) whose greedy descriptions name each subject's
    true exposure far above chance, and whose greedy critiques of the subject a prompt names assert its true
    values more often than the best a constant critique can (the majority value of every attribute), both
    differing from image to image."""
    from stages.families.internvl.model import load_base
    from stages.families.internvl.tokenizer import load_tokenizer
    from stages.pretrain.captioner import DESCRIBE_PROMPT, evaluate, evaluate_critiques, subject_truth
    from stages.report.attributes import attribute_scores, majority_critique

    model, missing = load_base(SHIPPED_BASE, fusion="none")
    assert not missing
    _, missing = load_base(SHIPPED_BASE)
    assert missing and all(".cross_attention." in k for k in missing)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(SHIPPED_BASE)
    result = evaluate(model, tokenizer, *renders, prompt=DESCRIBE_PROMPT)
    chance = {k: 1 / len(v) for k, v in ATTRIBUTES.items()}
    assert result["attributes"]["exposure"] > chance["exposure"] + 0.4, result
    assert result["distinct"] > 0.5, result

    truth = {i: subject_truth(r, i % 3) for i, r in enumerate(renders[1])}  # the subject each image is asked about
    constant = attribute_scores({i: majority_critique(list(truth.values())) for i in truth}, truth)
    critiques = evaluate_critiques(model, tokenizer, *renders)
    assert critiques["macro_precision"] > constant["macro_precision"] + 0.05, (critiques, constant)
    assert critiques["distinct"] > 0.2, critiques  # repetitive (0.29 here; README), yet far from one constant (0.02)


def test_no_shipped_synthetic_dataset_draws_from_the_pretraining_stream() -> None:
    """The shipped models were pretrained on images 0 .. 11,999 of seed ``CORPUS_SEED``: a synthetic dataset of the
    shipped manifest on that seed would score them (and the study) on images they trained on."""
    from pathlib import Path

    from pipeline.manifest import load_manifest

    manifest = load_manifest(Path(__file__).resolve().parents[1] / "data_manifest.yaml")
    synthetic = {name: spec.options.get("seed", 0) for name, spec in manifest.datasets.items()
                 if spec.format == "synthetic"}
    assert {"demo", "demo-study"} <= set(synthetic)
    assert CORPUS_SEED not in synthetic.values(), synthetic
