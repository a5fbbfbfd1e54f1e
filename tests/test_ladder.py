"""The ladder's rungs on a small ingested synthetic dataset, against the generator's truth: the EAT's subject
preference from a real saliency store holding known maps, and the shipped base's reading and naming."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.manifest import DatasetSpec, load_manifest
from test_finetune_data import make_manifest, make_store


@pytest.fixture
def syn(tmp_path: Path) -> dict:
    """An ingested synthetic dataset (60 images: 12 test, 6 validation) and its ground truth."""
    from stages.ingest.run import ingest_dataset
    from stages.synthetic.truth import ground_truth

    ingest_dataset(DatasetSpec(name="syn", format="synthetic", root=tmp_path / "syn", options={"n": 60, "seed": 3}),
                   echo=lambda s: None)
    return ground_truth("syn")


def _subject_maps(truth: dict, which: str) -> dict[str, np.ndarray]:
    """sha256 -> a 14 x 14 map: 1 on the aesthetic subject's label ("aesthetic"), on the subject a moved mask marks
    ("moved"), everywhere ("uniform")."""
    from stages.synthetic.truth import moved_subject
    from storage.tables import read_table

    maps = {}
    for row in read_table("syn", "images").to_pylist():
        entry = truth[row["image_id"]]
        subject = {"aesthetic": entry["aesthetic"], "moved": moved_subject(entry), "uniform": None}[which]
        with Image.open(entry["subject_labels"]) as labels:
            small = np.asarray(labels.resize((14, 14), Image.Resampling.BOX if subject is None else
                                             Image.Resampling.NEAREST))
        maps[row["sha256"]] = (np.ones((14, 14)) if subject is None else small == subject + 1).astype(np.float32)
    return maps


@pytest.mark.parametrize("which", ["aesthetic", "moved", "uniform"])
def test_eat_subject_preference_reads_where_the_stored_maps_are(syn: dict, tmp_path: Path, which: str) -> None:
    """Maps on the aesthetic subject: a strong preference; on another subject: far below 1; uniform: exactly 1."""
    from stages.report.ladder import eat_subject_preference
    from storage.tables import read_table

    manifest = load_manifest(make_manifest(tmp_path))
    maps = _subject_maps(syn, which)
    make_store(manifest, list(maps), maps=maps)
    result = eat_subject_preference("syn", manifest)
    n_test = read_table("syn", "images")["split"].to_pylist().count("test")
    assert n_test - 3 <= result["images"] <= n_test  # images with every subject visible at 224 px
    preference = result["preference"]
    if which == "aesthetic":
        assert preference > 5, result
    elif which == "moved":
        assert preference < 0.3, result
    else:
        assert preference == pytest.approx(1.0), result


def test_the_shipped_base_reads_the_subjects_and_the_named_rung_is_measured(syn: dict, tmp_path: Path) -> None:
    """R1 and R2 of the shipped base on held-out images (seed 3, never pretrained on), against the generator's
    truth: its descriptions name each subject's placement and exposure far above chance and its colour above
    chance (its focus, at chance, is the rung that broke: README "The demo's pretrained models"); R2 scores the
    forced choices of the prompt that names each image's aesthetic subject, every subject attribute on every
    test image."""
    import json

    from pipeline.paths import runs_dir
    from stages.pretrain.shipped import SHIPPED_BASE
    from stages.report.ladder import base_reading, named_oracle, named_prompt
    from stages.synthetic.attributes import ATTRIBUTES, CRITIQUE_PROMPT, SUBJECT_ATTRIBUTES

    run_dir = runs_dir("syn") / "r"
    run_dir.mkdir(parents=True)
    tiles = {"tile_size": 224, "max_tiles": 1, "tokens_per_tile": 64}  # the demo's `--max-tiles 1`
    (run_dir / "run_config.json").write_text(json.dumps({"fusion": "cross_attention", "base": str(SHIPPED_BASE),
                                                         "tiles": tiles}))
    manifest = load_manifest(make_manifest(tmp_path))
    reading = base_reading("syn", "r", manifest)
    assert reading["images"] == 12 and set(SUBJECT_ATTRIBUTES) <= set(reading)
    for key, margin in READ_MARGINS.items():
        assert reading[key] > 1 / len(ATTRIBUTES[key]) + margin, reading
    named = named_oracle("syn", "r", manifest)
    assert named["images"] == 12 and set(named["per_attribute"]) == set(SUBJECT_ATTRIBUTES), named
    assert set(named["other_subjects"]) == set(SUBJECT_ATTRIBUTES), named
    entry = next(iter(syn.values()))
    assert named_prompt(entry) in {CRITIQUE_PROMPT.format(p) for p in ("left", "middle", "right")}
    assert base_reading("syn", "r", manifest) == reading  # cached in reports/syn/ladder.json


def test_other_subjects_tells_reading_the_named_subject_from_reading_another() -> None:
    """Choices that copy the aesthetic subject's values match the others only where they share a value; choices
    that copy another subject's match it (oracle: the generator's truth)."""
    from stages.report.ladder import other_subjects
    from stages.synthetic.attributes import SUBJECT_ATTRIBUTES
    from stages.synthetic.corpus import annotation

    truth = {str(n): annotation(n, seed=4) for n in range(200)}
    named = {i: dict(e["subjects"][e["aesthetic"]]) for i, e in truth.items()}
    other = {i: dict(e["subjects"][(e["aesthetic"] + 1) % 3]) for i, e in truth.items()}
    shared = {k: np.mean([e["subjects"][j][k] == e["subjects"][e["aesthetic"]][k] for e in truth.values()
                          for j in range(3) if j != e["aesthetic"]]) for k in SUBJECT_ATTRIBUTES}
    assert other_subjects(named, truth) == pytest.approx(shared)
    for key, value in other_subjects(other, truth).items():
        assert value >= 0.5 and value > shared[key] + 0.1, (key, value, shared[key])


READ_MARGINS = {"placement": 0.3, "exposure": 0.3, "colour": 0.1}  # over chance, on 12 held-out images x 3 subjects
