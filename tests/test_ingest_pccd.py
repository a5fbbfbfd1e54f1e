"""PCCD converter on the 423 real validation records, via the CLI, against counts computed here."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app

ASPECTS = ["general_impression", "subject_of_photo", "composition", "use_of_camera",
           "depth_of_field", "color_lighting", "focus"]
MISSING = 3  # images deleted from the placeholder folder


@pytest.fixture(scope="module")
def pccd_root(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("pccd")
    records = json.loads((shared_dir / "data" / "pccd_guru_validation.json").read_text(encoding="utf-8"))
    shutil.copy(shared_dir / "data" / "pccd_guru_validation.json", root / "guru_validation.json")
    full = root / "images" / "full"
    full.mkdir(parents=True)
    for i, rec in enumerate(records[MISSING:]):
        Image.new("RGB", (16 + i % 5, 12), (i % 256, 80, 160)).save(full / rec["title"], format="JPEG")
    return root, records


def _manifest(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(f"datasets:\n  pccd:\n    format: pccd\n    root: {root}\n")
    return path


def _ingest(manifest: Path, *extra: str):
    result = CliRunner().invoke(app, ["--manifest", str(manifest), "ingest", "pccd", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_pccd_tables_match_json(tmp_path: Path, isolated_work: Path, pccd_root) -> None:
    root, records = pccd_root
    output = _ingest(_manifest(tmp_path, root))
    present = records[MISSING:]
    expected_comments = [(r["title"], a, r[a].strip()) for r in present for a in ASPECTS if r[a].strip()]

    out = isolated_work / "datasets" / "pccd"
    images = pq.read_table(out / "images.parquet").to_pylist()
    comments = pq.read_table(out / "comments.parquet").to_pylist()
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    meta = json.loads((out / "meta.json").read_text())

    assert [i["image_id"] for i in images] == [r["title"] for r in present]
    assert {i["split"] for i in images} == {"validation"}
    assert [i["score"] for i in images] == [float(r["overall"]) for r in present]
    assert sorted((c["image_id"], c["aspect"], c["text"]) for c in comments) == sorted(expected_comments)
    assert Counter(c["aspect"] for c in comments) == Counter(a for _, a, _ in expected_comments)
    assert len({c["comment_id"] for c in comments}) == len(comments)
    assert not any("description" == c["aspect"] for c in comments)
    # widths follow the placeholder sizes written above
    assert [i["width"] for i in images] == [16 + k % 5 for k in range(len(present))]
    assert sorted(q["image_id"] for q in quarantine) == sorted(r["title"] for r in records[:MISSING])
    assert {q["reason"] for q in quarantine} == {"missing_image"}
    assert Path(meta["root"]) == (root / "images" / "full").absolute()
    assert meta["format"] == "pccd" and meta["counts"]["images"] == len(present)
    # absent splits are reported, not fatal; the summary names the counts
    assert "split train: guru_train.json not found" in output
    assert "split test: guru_test.json not found" in output
    assert f"{len(present)} images (train 0, validation {len(present)}, test 0)" in output
    assert f"{len(expected_comments):,} comments" in output
    assert f"{MISSING} quarantined (missing_image {MISSING})" in output


def test_pccd_incremental(tmp_path: Path, isolated_work: Path, pccd_root) -> None:
    root, records = pccd_root
    manifest = _manifest(tmp_path, root)
    _ingest(manifest)
    out = isolated_work / "datasets" / "pccd"
    stamp = (out / "images.parquet").stat().st_mtime_ns
    assert "up to date" in _ingest(manifest)
    assert (out / "images.parquet").stat().st_mtime_ns == stamp
    assert "up to date" not in _ingest(manifest, "--force")
    # restoring a missing image changes the fingerprint: it is picked up
    extra = root / "images" / "full" / records[0]["title"]
    Image.new("RGB", (20, 10)).save(extra, format="JPEG")
    try:
        output = _ingest(manifest)
        assert "up to date" not in output
        assert f"{MISSING - 1} quarantined" in output
        ids = pq.read_table(out / "images.parquet", columns=["image_id"]).column(0).to_pylist()
        assert records[0]["title"] in ids
    finally:
        extra.unlink()
