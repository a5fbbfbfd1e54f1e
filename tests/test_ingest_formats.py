"""RPCD, DPC2022, AVA-Captions and synthetic converters on small release-shaped inputs built here."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.manifest import DatasetSpec
from pipeline.paths import dataset_dir
from stages.ingest.run import ingest_dataset


def _tables(name: str) -> tuple[list[dict], list[dict], list[dict]]:
    d = dataset_dir(name)
    return tuple(pq.read_table(d / f"{t}.parquet").to_pylist() for t in ("images", "comments", "quarantine"))


def _jpeg(path: Path, size: tuple[int, int] = (24, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path, format="JPEG")


def test_rpcd_processed(tmp_path: Path) -> None:
    root = tmp_path / "rpcd"
    recs = {
        "train": [{"im_id": "aa1", "im_paths": "aa1-image.jpg", "mean_score": 0.61,
                   "first_level_comments_values": ["Nice colours.", "Crop the left side."]}],
        "test": [{"im_id": "bb2", "im_paths": "bb2-image.png", "mean_score": 0.4,
                  "first_level_comments_values": ["Too dark."]},
                 {"im_id": "cc3", "im_paths": "cc3-image.jpg", "mean_score": None,
                  "first_level_comments_values": []}],
    }
    for split, rows in recs.items():
        (root / f"processed_{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"processed_{split}.json").write_text(json.dumps(rows))
        for r in rows:
            _jpeg(root / r["im_paths"])
    said: list[str] = []
    ingest_dataset(DatasetSpec(name="rpcd", format="rpcd", root=root), echo=said.append)
    images, comments, quarantine = _tables("rpcd")
    assert [(i["image_id"], i["split"], i["path"], i["score"]) for i in images] == [
        ("aa1", "train", "aa1-image.jpg", 0.61), ("bb2", "test", "bb2-image.png", 0.4), ("cc3", "test", "cc3-image.jpg", None)]
    assert [(c["image_id"], c["text"], c["aspect"]) for c in comments] == [
        ("aa1", "Nice colours.", None), ("aa1", "Crop the left side.", None), ("bb2", "Too dark.", None)]
    assert quarantine == []
    assert any("split validation" in s and "skipped" in s for s in said)


def test_rpcd_raw_with_real_test_ids(tmp_path: Path, shared_dir: Path) -> None:
    ids = [line.strip() for line in (shared_dir / "data" / "rpcd_test_ids.csv").read_text().splitlines() if line.strip()]
    root = tmp_path / "rpcd"
    root.mkdir()
    (root / "test_ids.csv").write_text((shared_dir / "data" / "rpcd_test_ids.csv").read_text())
    in_test, not_test = ids[:3], ["zzzzzz1", "zzzzzz2"]
    assert not set(not_test) & set(ids)
    paths = [f"{i}-image.jpg" for i in in_test + not_test]
    for p in paths:
        _jpeg(root / "images" / p)
    columns = {"im_paths": paths, "first_level_comments_values": [[f"critique of {p}"] for p in paths],
               "aspect_prediction": [[{}] for _ in paths]}
    (root / "reddit_photocritique_image_comments.json").write_text(json.dumps(columns))
    spec = DatasetSpec(name="rpcd_raw", format="rpcd", root=root, image_dir="images")
    ingest_dataset(spec, echo=lambda s: None)
    images, comments, _ = _tables("rpcd_raw")
    assert [(i["image_id"], i["split"]) for i in images] == [(i, "test") for i in in_test]
    assert [c["text"] for c in comments] == [f"critique of {i}-image.jpg" for i in in_test]


def test_dpc2022(tmp_path: Path) -> None:
    root = tmp_path / "dpc"
    ann = root / "clean_and_all_score"
    ann.mkdir(parents=True)
    (ann / "101.json").write_text(json.dumps({
        "ID": "101", "avg_all_users_score": 5.31, "clean_comments": ["unused when scored exist"],
        "score_comments": [{"comment": {"comment": "great use of light"}, "sum_score": 3.1},
                           {"comment": {"comment": "  "}, "sum_score": 0.0}],
    }))
    (ann / "102.json").write_text(json.dumps({"ID": "102", "clean_comments": ["sharp focus", "nice"]}))
    (ann / "104.json").write_text("{broken")
    for i in ("101", "102", "104"):
        _jpeg(root / "images" / f"{i}.jpg")
    with open(root / "train.csv", "w", newline="") as fh:  # ARIC: one row per comment, ids repeat
        w = csv.writer(fh)
        w.writerow(["index", "ID", "comment", "score"])
        w.writerows([[0, 101, "a", 5.3], [1, 101, "b", 5.3], [2, 103, "c", 4.0]])
    (root / "test.csv").write_text("ID,score\n102,4.9\n104,5.0\n")
    said: list[str] = []
    ingest_dataset(DatasetSpec(name="dpc", format="dpc2022", root=root), echo=said.append)
    images, comments, quarantine = _tables("dpc")
    assert [(i["image_id"], i["split"], i["path"], i["score"]) for i in images] == [
        ("101", "train", "101.jpg", 5.31), ("102", "test", "102.jpg", None)]
    assert [(c["image_id"], c["text"]) for c in comments] == [
        ("101", "great use of light"), ("102", "sharp focus"), ("102", "nice")]
    assert sorted((q["image_id"], q["reason"]) for q in quarantine) == [
        ("101", "empty_comment"), ("103", "missing_annotation"), ("104", "bad_annotation")]
    assert any("split validation: val.csv not found" in s for s in said)


def test_ava_captions(tmp_path: Path) -> None:
    root = tmp_path / "ava"
    data = {"dataset": "AVA", "images": [
        {"filename": "11.jpg", "split": "train", "sentences": [{"raw": "Lovely tones."}, {"raw": "Soft focus."}]},
        {"filename": "12.jpg", "split": "val", "sentences": [{"raw": "Too busy."}]},
        {"filename": "13.jpg", "split": "test", "sentences": [{"raw": ""}]},
        {"filename": "14.jpg", "split": "restval", "sentences": []},
        {"filename": "15.jpg", "split": "holdout", "sentences": []},
    ]}
    root.mkdir()
    (root / "captions.json").write_text(json.dumps(data))
    for n in (11, 12, 13, 14):
        _jpeg(root / "images" / f"{n}.jpg")
    spec = DatasetSpec(name="ava", format="ava_captions", root=root, splits={"all": "captions.json"})
    ingest_dataset(spec, echo=lambda s: None)
    images, comments, quarantine = _tables("ava")
    assert [(i["image_id"], i["split"]) for i in images] == [
        ("11", "train"), ("12", "validation"), ("13", "test"), ("14", "train")]
    assert [(c["image_id"], c["text"]) for c in comments] == [
        ("11", "Lovely tones."), ("11", "Soft focus."), ("12", "Too busy.")]
    assert sorted((q["image_id"], q["reason"]) for q in quarantine) == [("13", "empty_comment"), ("15.jpg", "bad_record")]


def test_synthetic_handwritten(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    _jpeg(root / "images" / "s0.jpg", (40, 30))
    _jpeg(root / "images" / "s1.jpg", (30, 40))
    rows = [{"image_id": "s0", "split": "train", "file": "images/s0.jpg", "score": 6.5,
             "references": ["Warm light on the subject."], "attributes": {"light": "warm"}, "mask": "masks/s0.png"},
            {"image_id": "s1", "split": "test", "file": "images/s1.jpg", "score": 3.0,
             "references": ["Subject is off centre.", "Cold palette."], "attributes": {}, "mask": "masks/s1.png"}]
    (root / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DatasetSpec(name="syn", format="synthetic", root=root, options={"generate": False})
    ingest_dataset(spec, echo=lambda s: None)
    images, comments, quarantine = _tables("syn")
    assert [(i["image_id"], i["split"], i["score"], i["width"], i["height"]) for i in images] == [
        ("s0", "train", 6.5, 40, 30), ("s1", "test", 3.0, 30, 40)]
    assert [c["text"] for c in comments] == [t for r in rows for t in r["references"]]
    assert quarantine == []


def test_synthetic_generated_corpus(tmp_path: Path) -> None:
    pytest.importorskip("stages.synthetic.corpus")
    root = tmp_path / "demo"
    spec = DatasetSpec(name="demo", format="synthetic", root=root, options={"n": 12, "seed": 3})
    result = ingest_dataset(spec, echo=lambda s: None)
    lines = [json.loads(x) for x in (root / "annotations.jsonl").read_text().splitlines() if x.strip()]
    images, comments, quarantine = _tables("demo")
    assert [i["image_id"] for i in images] == [r["image_id"] for r in lines]
    assert [i["split"] for i in images] == [r["split"] for r in lines]
    assert len(comments) == sum(len(r["references"]) for r in lines)
    assert quarantine == [] and result.counts["images"] == 12
    assert ingest_dataset(spec, echo=lambda s: None).up_to_date


def test_every_manifest_format_has_a_converter_and_no_converter_is_unlisted() -> None:
    """The manifest's FORMATS owns the format names: each is a converter module, and no module is unlisted."""
    from pipeline.manifest import FORMATS
    from stages.ingest import formats

    modules = {p.stem for p in Path(formats.__file__).parent.glob("*.py") if p.stem != "__init__"}
    assert modules == set(FORMATS)
    for fmt in FORMATS:
        module = formats.converter(fmt)
        assert callable(module.convert) and isinstance(module.VERSION, (int, str))
    with pytest.raises(ValueError, match="unknown dataset format 'nope'"):
        formats.converter("nope")
