"""The demo models' pretraining: corpus cache = the demo's own image pipeline, targets, and what the two
pretraining runs save (official EAT layout; a plain InternVL base that loads with only the new keys missing)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.synthetic.attributes import ATTRIBUTES
from stages.synthetic.corpus import PATTERN_NAMES, SKY_NAMES, SUBJECT_ATTRIBUTES, generate_corpus
from stages.synthetic import pretraining_corpus as pc
from stages.pretrain.targets import CLASSES, DENSE, REGRESSIONS, AuxHeads, DenseHeads, Targets, dense_targets


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> pc.PretrainCorpus:
    import os

    os.environ["ASE_WORK"] = str(tmp_path_factory.mktemp("work"))
    try:
        return pc.build_corpus(24, seed=9, workers=1)
    finally:
        os.environ.pop("ASE_WORK")


def test_corpus_images_are_the_demo_pipeline_images(small: pc.PretrainCorpus, tmp_path: Path) -> None:
    """Oracle: the generator's JPEG and label files for the same seed, decoded and resized the way EAT / one-tile
    InternVL do (labels: nearest)."""
    generate_corpus(tmp_path / "files", n=6, seed=9, workers=1)
    for i in range(6):
        with Image.open(tmp_path / "files" / "images" / f"syn{i:05d}.jpg") as img:
            expected = np.asarray(img.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC))
        assert np.array_equal(small.images[i], expected)
        with Image.open(tmp_path / "files" / "subjects" / f"syn{i:05d}.png") as labels:
            expected = np.asarray(labels.resize((224, 224), Image.Resampling.NEAREST))
        assert np.array_equal(small.labels[i], expected)
    records = [json.loads(line) for line in (tmp_path / "files" / "annotations.jsonl").read_text().splitlines()]
    for key in ("attributes", "subjects", "aesthetic", "scene"):
        assert [r[key] for r in records] == [r[key] for r in small.records[:6]]
    assert [r["score"] for r in records] == [r["score"] for r in small.records[:6]]


def test_corpus_rebuild_repairs_an_unfinished_chunk(small: pc.PretrainCorpus, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill before a chunk's ledger entry leaves garbage bytes and no entry: the rebuild rewrites that chunk only."""
    monkeypatch.setenv("ASE_WORK", str(tmp_path))
    first = pc.build_corpus(24, seed=9, workers=1, chunk_size=8)
    assert np.array_equal(np.asarray(first.images), np.asarray(small.images))  # chunking does not change bytes
    assert np.array_equal(np.asarray(first.labels), np.asarray(small.labels))
    root = pc.corpus_dir(9)
    kept = (root / "done" / "00000.json").stat().st_mtime_ns
    (root / "done" / "00001.json").unlink()
    with open(root / "images.u8", "r+b") as fh:
        fh.seek(8 * 224 * 224 * 3 + 1000)
        fh.write(b"\xff" * 5000)
    again = pc.build_corpus(24, seed=9, workers=1, chunk_size=8)
    assert np.array_equal(np.asarray(again.images), np.asarray(small.images))
    assert np.array_equal(np.asarray(again.labels), np.asarray(small.labels))
    assert (root / "done" / "00000.json").stat().st_mtime_ns == kept


def test_targets_follow_the_records(small: pc.PretrainCorpus) -> None:
    """Dense targets: each cell gets the attributes of the subject its centre lies on (the generator's label map,
    every subject alike), background none; pooled: the globals and the scene; the aesthetic subject's attributes
    (the EAT's) are its subject's."""
    t = Targets.of(small.records)
    assert t.classes.shape == (24, len(CLASSES)) and t.values.shape == (24, len(REGRESSIONS))
    assert t.subjects.shape == (24, 3, len(DENSE)) and t.aesthetic.shape == (24, len(SUBJECT_ATTRIBUTES))
    labels = torch.from_numpy(np.array(small.labels))  # [24, 224, 224]
    cells = dense_targets(labels, t.subjects, 16)  # [24, 256, classes]
    names = list(DENSE)
    for n, rec in enumerate(small.records):
        for j in range(256):
            row, col = divmod(j, 16)
            subject = int(labels[n, 14 * row + 7, 14 * col + 7]) - 1  # the label under the cell's centre pixel
            if subject < 0:
                assert (cells[n, j] == -1).all()
                continue
            for key in SUBJECT_ATTRIBUTES:
                assert ATTRIBUTES[key][cells[n, j, names.index(key)]] == rec["subjects"][subject][key]
            assert PATTERN_NAMES[cells[n, j, names.index("pattern")]] == rec["scene"]["subjects"][subject]["pattern"]
        assert [ATTRIBUTES[k][v] for k, v in zip(SUBJECT_ATTRIBUTES, t.aesthetic[n].tolist())] == [
            rec["subjects"][rec["aesthetic"]][k] for k in SUBJECT_ATTRIBUTES]
        for key in ("horizon", "noise"):
            assert ATTRIBUTES[key][t.classes[n, list(CLASSES).index(key)]] == rec["attributes"][key]
        assert SKY_NAMES[t.classes[n, list(CLASSES).index("sky")]] == rec["scene"]["sky"]
    assert (cells[..., 0] >= 0).float().mean() > 0.05  # the subjects cover cells
    flipped = t.flipped(torch.tensor([True] * 12 + [False] * 12))
    angle = list(REGRESSIONS).index("horizon_angle")
    assert torch.equal(flipped.values[:12, angle], -t.values[:12, angle])
    assert torch.equal(flipped.values[12:], t.values[12:])
    assert not any("aesthetic" in name for name in [*CLASSES, *REGRESSIONS, *DENSE])
    dense, heads = DenseHeads(16), AuxHeads(16)
    loss = dense.loss(torch.randn(24, 256, 16), cells) + heads.loss(torch.randn(24, 16), t)
    assert torch.isfinite(loss) and loss > 0


@pytest.mark.slow
def test_pretraining_runs_save_what_the_pipeline_loads(small: pc.PretrainCorpus, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.families.internvl.model import load_base
    from stages.families.internvl.tokenizer import load_tokenizer
    from stages.pretrain.captioner import CaptionerRecipe, describe_cache, pretrain_captioner
    from stages.pretrain.eat import EatRecipe, pretrain_eat
    from stages.saliency.eat import build_eat, load_eat_weights

    images, labels, records = np.asarray(small.images[:16]), np.asarray(small.labels[:16]), small.records[:16]
    val_images, val_records = pc.validation_set(9, 1000, 4)
    assert val_records[0]["mask"].shape == (224, 224) and val_records[0]["mask"].dtype == bool
    metrics = pretrain_eat(images, labels, records, (val_images, val_records),
                           EatRecipe(variant="nano", epochs=1, batch_size=8), tmp_path / "eat.safetensors")
    load_eat_weights(build_eat("nano"), tmp_path / "eat.safetensors")  # strict: exactly the official layout
    assert set(metrics["validation"]) >= {"srcc", "mask_ratio", "subject_preference", "attributes",
                                          "aesthetic_attributes", "cells_read"}

    monkeypatch.setenv("ASE_WORK", str(tmp_path / "work"))
    recipe = CaptionerRecipe(epochs=1, batch_size=8, vocab_size=400, critique_steps=2)
    metrics = pretrain_captioner(images, labels, records, (val_images, val_records), recipe, tmp_path / "base",
                                 corpus_seed=9)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["model_type"] == "internvl" and "ias_fusion" not in config  # a plain base, as users download
    _, missing = load_base(tmp_path / "base")
    assert missing and all(".cross_attention." in k for k in missing)
    load_tokenizer(tmp_path / "base")  # has the image tokens
    assert 0 <= metrics["validation"]["mean_accuracy"] <= 1 and len(metrics["critique_history"]) == 1
    assert set(metrics["history"][0]["token_reading"]) == {"placement", "exposure", "colour", "focus"}
    assert 0 <= metrics["validation"]["critique"]["macro_precision"] <= 1
    named = metrics["validation"]["critique"]["named_choice"]  # the naming rung on held-out renders
    assert set(named) == {"placement", "exposure", "colour", "focus", "mean"}
    assert all(0 <= v <= 1 for v in named.values())
    # its scores from the plain transformers model equal those of our model (which normalises uint8 tiles itself)
    from transformers import InternVLForConditionalGeneration

    from stages.pretrain.captioner import named_logprobs

    tokenizer = load_tokenizer(tmp_path / "base")
    plain = named_logprobs(InternVLForConditionalGeneration.from_pretrained(tmp_path / "base"), tokenizer, val_images)
    ours = named_logprobs(load_base(tmp_path / "base", fusion="none")[0], tokenizer, val_images)
    assert all(np.allclose(plain[i], ours[i], atol=1e-4) for i in plain)

    # phase 2 alone reruns from phase 1's cache (a new critique recipe keeps the same phase 1)
    cache = describe_cache(recipe, len(images), 9)
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    again = pretrain_captioner(images, labels, records, (val_images, val_records), CaptionerRecipe(
        epochs=1, batch_size=8, vocab_size=400, critique_steps=3), tmp_path / "base", corpus_seed=9)
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp and again["history"] == metrics["history"]
