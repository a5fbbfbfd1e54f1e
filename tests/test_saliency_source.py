"""Saliency sources: the synthetic corpus's true masks as maps, the uniform control, and runs that use them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.manifest import load_manifest
from stages.finetune.saliency_source import MovedTruthMaps, ShuffledTruthMaps, TruthMaps, open_source
from stages.ingest.run import ingest_dataset


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    """A 12-image synthetic dataset, ingested; returns the manifest path."""
    path = tmp_path / "manifest.yaml"
    path.write_text(f"datasets:\n  syn:\n    format: synthetic\n    root: {tmp_path / 'corpus'}\n"
                    f"    options: {{n: 12, seed: 4}}\n")
    ingest_dataset(load_manifest(path).datasets["syn"], echo=lambda _: None)
    return path


def test_truth_maps_are_the_masks_area_averaged(synthetic: Path) -> None:
    from storage.tables import read_table

    source = TruthMaps("syn")
    rows = read_table("syn", "images").to_pylist()
    root = synthetic.parent / "corpus"
    for row in rows:
        m, category, _ = source.read(row["sha256"])
        with Image.open(root / "masks" / f"{row['image_id']}.png") as img:
            mask = np.asarray(img, dtype=np.float32) / 255  # [H, W] in {0, 1}
        assert m.shape == (56, 56) and m.min() >= 0 and m.max() <= 1 and category == -1
        assert m.mean() == pytest.approx(mask.mean(), abs=0.01)  # area averaging keeps the covered share
        up = F.interpolate(torch.from_numpy(m)[None, None], size=mask.shape, mode="bilinear")[0, 0].numpy()
        assert np.corrcoef(up.ravel(), mask.ravel())[0, 1] > 0.9


def test_shuffled_maps_give_each_image_another_image_mask_of_its_split(synthetic: Path) -> None:
    """Every image gets a mask of its own split that is not its own, and each mask of the split serves once."""
    from storage.tables import read_table

    own, shuffled = TruthMaps("syn"), ShuffledTruthMaps("syn")
    rows = read_table("syn", "images").to_pylist()
    digest = {r["sha256"]: own.read(r["sha256"])[0].tobytes() for r in rows}
    for split in {r["split"] for r in rows}:
        shas = [r["sha256"] for r in rows if r["split"] == split]
        given = [shuffled.read(sha)[0].tobytes() for sha in shas]
        assert sorted(given) == sorted(digest[sha] for sha in shas)  # a permutation of the split's masks
        if len(shas) > 1:
            assert all(g != digest[sha] for g, sha in zip(given, shas))  # nobody keeps its own
    store, _ = open_source("shuffled", "syn", load_manifest(synthetic))
    assert isinstance(store, ShuffledTruthMaps)


def test_moved_maps_mark_another_subject_of_the_same_image(synthetic: Path) -> None:
    """The moved map covers the next subject's dilated silhouette (where the generator drew that subject's
    centre), of the same size class as the true mask, and overlaps the true mask little."""
    from stages.synthetic.truth import ground_truth, moved_subject
    from storage.tables import read_table

    own, moved = TruthMaps("syn"), MovedTruthMaps("syn")
    truth = ground_truth("syn")
    for row in read_table("syn", "images").to_pylist():
        entry = truth[row["image_id"]]
        true_mask, moved_mask = (np.asarray(src.full_mask(row["sha256"])) > 0 for src in (own, moved))
        with Image.open(entry["subject_labels"]) as labels:
            assert (moved_mask == (np.asarray(labels) == moved_subject(entry) + 1)).all()
        assert moved_subject(entry) != entry["aesthetic"]
        assert (true_mask & moved_mask).sum() < 0.2 * moved_mask.sum()
        assert 0.2 < moved_mask.sum() / true_mask.sum() < 5
        assert moved.read(row["sha256"])[0].shape == (56, 56)
    store, _ = open_source("moved", "syn", load_manifest(synthetic))
    assert isinstance(store, MovedTruthMaps)


def test_uniform_source_and_truth_on_real_data(synthetic: Path, tmp_path: Path) -> None:
    store, why = open_source("uniform", "syn", load_manifest(synthetic))
    assert store is None and "uniform" in why
    from test_finetune_data import make_toy

    make_toy(tmp_path)
    with pytest.raises(ValueError, match="synthetic dataset"):
        TruthMaps("toy")
    with pytest.raises(ValueError, match="must be one of"):
        open_source("gaze", "syn", None)


@pytest.mark.slow
def test_runs_train_and_generate_with_true_and_uniform_maps(synthetic: Path) -> None:
    """A run on true masks reads them in training and generation; a uniform run needs no store at all."""
    from stages.finetune.train import TrainConfig, finetune
    from stages.report.generate import DecodeConfig, generate_split, read_predictions
    from storage.tables import read_table

    manifest = load_manifest(synthetic)
    n_train = sum(s == "train" for s in read_table("syn", "images")["split"].to_pylist())
    for source in ("truth", "uniform"):
        cfg = TrainConfig(dataset="syn", run=source, saliency=source, max_steps=2, global_batch_size=2,
                          per_device_batch_size=2, max_tiles=1, workers=0, vocab_size=300, save_steps=10)
        summary = finetune(cfg, manifest)
        assert summary.global_step == 2
        assert summary.missing_saliency == (0 if source == "truth" else n_train)  # images given the uniform map
        g = generate_split("syn", source, manifest, "test", decode=DecodeConfig(max_new_tokens=4), progress=False)
        assert g.generated > 0 and not g.failed and len(read_predictions(g.directory, "test")) == g.generated
