"""The demo models' pretraining: corpus cache = the demo's own image pipeline, targets, and what the two
pretraining runs save (official EAT layout; a plain InternVL base that loads with only the new keys missing)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.synthetic.attributes import ATTRIBUTES, POSITIONS
from stages.synthetic.corpus import SKY_NAMES, SUBJECT_ATTRIBUTES, generate_corpus
from stages.synthetic import pretraining_corpus as pc
from stages.pretrain.targets import CLASSES, REGRESSIONS, AuxHeads, Targets


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> pc.PretrainCorpus:
    import os

    os.environ["ASE_WORK"] = str(tmp_path_factory.mktemp("work"))
    try:
        return pc.build_corpus(24, seed=9, workers=1)
    finally:
        os.environ.pop("ASE_WORK")


def test_corpus_images_are_the_demo_pipeline_images(small: pc.PretrainCorpus, tmp_path: Path) -> None:
    """Oracle: the generator's JPEG files for the same seed, decoded and resized the way EAT / one-tile InternVL do."""
    generate_corpus(tmp_path / "files", n=6, seed=9, workers=1)
    for i in range(6):
        with Image.open(tmp_path / "files" / "images" / f"syn{i:05d}.jpg") as img:
            expected = np.asarray(img.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC))
        assert np.array_equal(small.images[i], expected)
    records = [json.loads(line) for line in (tmp_path / "files" / "annotations.jsonl").read_text().splitlines()]
    for key in ("attributes", "subjects", "aesthetic"):
        assert [r[key] for r in records] == [r[key] for r in small.records[:6]]
    assert [r["score"] for r in records] == [r["score"] for r in small.records[:6]]


def test_corpus_rebuild_repairs_an_unfinished_chunk(small: pc.PretrainCorpus, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill before a chunk's ledger entry leaves garbage bytes and no entry: the rebuild rewrites that chunk only."""
    monkeypatch.setenv("ASE_WORK", str(tmp_path))
    first = pc.build_corpus(24, seed=9, workers=1, chunk_size=8)
    assert np.array_equal(np.asarray(first.images), np.asarray(small.images))  # chunking does not change bytes
    root = pc.corpus_dir(9)
    kept = (root / "done" / "00000.json").stat().st_mtime_ns
    (root / "done" / "00001.json").unlink()
    with open(root / "images.u8", "r+b") as fh:
        fh.seek(8 * 224 * 224 * 3 + 1000)
        fh.write(b"\xff" * 5000)
    again = pc.build_corpus(24, seed=9, workers=1, chunk_size=8)
    assert np.array_equal(np.asarray(again.images), np.asarray(small.images))
    assert (root / "done" / "00000.json").stat().st_mtime_ns == kept


def test_targets_follow_the_records(small: pc.PretrainCorpus) -> None:
    """Every subject's attributes by left-to-right position, the globals, the scene; nothing marks the aesthetic
    subject (its position among the three varies)."""
    t = Targets.of(small.records)
    assert t.classes.shape == (24, len(CLASSES)) and t.values.shape == (24, len(REGRESSIONS))
    names = list(CLASSES)
    ranks = []
    for row, values, rec in zip(t.classes.tolist(), t.values.tolist(), small.records):
        order = sorted(range(3), key=lambda k: rec["scene"]["subjects"][k]["x"])
        for pos, k in zip(POSITIONS, order):
            for key in SUBJECT_ATTRIBUTES:
                assert ATTRIBUTES[key][row[names.index(f"{pos} {key}")]] == rec["subjects"][k][key]
            assert values[list(REGRESSIONS).index(f"{pos} x")] == pytest.approx(rec["scene"]["subjects"][k]["x"])
        for key in ("horizon", "noise"):
            assert ATTRIBUTES[key][row[names.index(key)]] == rec["attributes"][key]
        assert SKY_NAMES[row[names.index("sky")]] == rec["scene"]["sky"]
        ranks.append(order.index(rec["aesthetic"]))
    assert len(set(ranks)) == 3
    assert not any("aesthetic" in name for name in [*CLASSES, *REGRESSIONS])
    heads = AuxHeads(16)
    loss = heads.loss(torch.randn(24, 16), t)
    assert torch.isfinite(loss) and loss > 0


@pytest.mark.slow
def test_pretraining_runs_save_what_the_pipeline_loads(small: pc.PretrainCorpus, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.families.internvl.model import load_base
    from stages.families.internvl.tokenizer import load_tokenizer
    from stages.pretrain.captioner import CaptionerRecipe, describe_cache, pretrain_captioner
    from stages.pretrain.eat import EatRecipe, pretrain_eat
    from stages.saliency.eat import build_eat, load_eat_weights

    images, records = np.asarray(small.images[:16]), small.records[:16]
    val_images, val_records = pc.validation_set(9, 1000, 4)
    assert val_records[0]["mask"].shape == (224, 224) and val_records[0]["mask"].dtype == bool
    metrics = pretrain_eat(images, records, (val_images, val_records), EatRecipe(epochs=1, batch_size=8),
                           tmp_path / "eat.safetensors")
    load_eat_weights(build_eat("tiny"), tmp_path / "eat.safetensors")  # strict: exactly the official layout
    assert set(metrics["validation"]) >= {"srcc", "mask_ratio", "attributes"}

    monkeypatch.setenv("ASE_WORK", str(tmp_path / "work"))
    recipe = CaptionerRecipe(epochs=1, batch_size=8, vocab_size=400, critique_steps=2)
    metrics = pretrain_captioner(images, records, (val_images, val_records), recipe, tmp_path / "base", corpus_seed=9)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["model_type"] == "internvl" and "ias_fusion" not in config  # a plain base, as users download
    _, missing = load_base(tmp_path / "base")
    assert missing and all(".cross_attention." in k for k in missing)
    load_tokenizer(tmp_path / "base")  # has the image tokens
    assert 0 <= metrics["validation"]["mean_accuracy"] <= 1 and len(metrics["critique_history"]) == 1
    assert 0 <= metrics["validation"]["critique"]["macro_precision"] <= 1

    # phase 2 alone reruns from phase 1's cache (a new critique recipe keeps the same phase 1)
    cache = describe_cache(recipe, len(images), 9)
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    again = pretrain_captioner(images, records, (val_images, val_records), CaptionerRecipe(
        epochs=1, batch_size=8, vocab_size=400, critique_steps=3), tmp_path / "base", corpus_seed=9)
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp and again["history"] == metrics["history"]
