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
