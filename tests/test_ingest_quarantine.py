"""Every kind of bad input is handled or quarantined with its reason; the run never stops."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.manifest import DatasetSpec, load_manifest
from pipeline.paths import dataset_dir
from stages.ingest.run import MAX_COMMENT_CHARS, ingest_dataset


def _bomb(path: Path) -> None:
    """A valid PNG whose header claims 100k x 100k pixels."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _images(img: Path) -> None:
    rng = np.random.default_rng(0)
    img.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img / "good.jpg")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(img / "cmyk.jpg")
    Image.fromarray(np.full((10, 12), 65535, np.uint16)).save(img / "g16.png")
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.save(img / "pal.png", transparency=0)
    Image.new("RGBA", (9, 7), (255, 0, 0, 0)).save(img / "rgba.png")
    rot = Image.new("RGB", (40, 20))
    exif = rot.getexif()
    exif[0x0112] = 8
    rot.save(img / "rot.jpg", exif=exif)
    data = (img / "good.jpg").read_bytes()
    (img / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (img / "zero.jpg").write_bytes(b"")
    (img / "text.jpg").write_text("hello\n")
    Image.new("RGB", (420, 10)).save(img / "wide.png")
    _bomb(img / "bomb.png")


ACCEPTED = {"good": (64, 48), "cmyk": (30, 20), "g16": (12, 10), "pal": (8, 8), "rgba": (9, 7), "rot": (20, 40)}
REJECTED = {
    "trunc": "truncated_image", "zero": "empty_file", "text": "not_an_image", "missing": "missing_image",
    "wide": "extreme_aspect_ratio", "bomb": "too_many_pixels", "escape": "path_escapes_root",
    "absolute": "path_escapes_root",
}


def test_every_bad_input_is_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    _images(root / "img")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.jpg")  # exists, but outside the root
    files = {name: f"img/{name}.{'png' if name in ('g16', 'pal', 'rgba', 'wide', 'bomb') else 'jpg'}"
             for name in [*ACCEPTED, *REJECTED]}
    files["escape"] = "../outside.jpg"
    files["absolute"] = str(tmp_path / "outside.jpg")
    lines = [json.dumps({"image_id": n, "split": "train", "file": f, "score": 5.0, "references": [f"ref of {n}"]})
             for n, f in files.items()]
    lines.append(json.dumps({"image_id": "good", "split": "test", "file": "img/cmyk.jpg", "references": ["x"]}))
    lines.append("{not json")
    lines.append(json.dumps({"image_id": "pal", "split": "train", "file": "img/pal.png", "references": []})
                 .replace('"pal"', '"pal2"', 1))
    body = "\n".join(lines).encode()
    # one more image whose references are empty, whitespace-only and not UTF-8
    body += b'\n{"image_id": "words", "split": "validation", "file": "img/good.jpg", ' \
            b'"references": ["", "  \\t ", "Tr\xe8s bien", "Fine composition."]}\n'
    (root / "annotations.jsonl").write_bytes(body)

    spec = DatasetSpec(name="bad", format="synthetic", root=root, options={"generate": False})
    said: list[str] = []
    result = ingest_dataset(spec, workers=2, echo=said.append)

    d = dataset_dir("bad")
    images = {r["image_id"]: r for r in pq.read_table(d / "images.parquet").to_pylist()}
    comments = pq.read_table(d / "comments.parquet").to_pylist()
    quarantine = pq.read_table(d / "quarantine.parquet").to_pylist()

    assert {k: (v["width"], v["height"]) for k, v in images.items() if k in ACCEPTED} == ACCEPTED
    assert set(images) == {*ACCEPTED, "pal2", "words"}
    got = {(q["image_id"], q["reason"]) for q in quarantine}
    assert {(n, r) for n, r in REJECTED.items()} <= got
    assert ("good", "duplicate_id") in got
    assert (None, "bad_record") in got
    assert ("words", "empty_comment") in got and ("words", "non_utf8") in got
    reasons = [q["reason"] for q in quarantine]
    assert reasons.count("empty_comment") == 2 and reasons.count("non_utf8") == 1
    assert len(quarantine) == len(REJECTED) + 1 + 1 + 3
    assert [c["text"] for c in comments if c["image_id"] == "words"] == ["Fine composition."]
    assert not any("\ufffd" in c["text"] for c in comments)
    # the end-of-run summary counts them
    summary = said[-1]
    assert f"{len(images)} images" in summary and f"{len(quarantine)} quarantined" in summary
    assert "path_escapes_root 2" in summary and "empty_comment 2" in summary and "missing_image 1" in summary


def test_folder_of_photos_with_sidecars(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "trip" / ".thumbs").mkdir(parents=True)
    Image.new("RGB", (30, 20), (10, 20, 30)).save(root / "trip" / "lake.jpg")
    (root / "trip" / "lake.txt").write_text("Strong leading lines.\n\n   \nHorizon is tilted.\n")
    Image.new("RGB", (20, 30)).save(root / "cat.PNG")
    Image.new("RGB", (20, 30)).save(root / "trip" / ".thumbs" / "lake.jpg")  # hidden: skipped
    Image.new("RGB", (20, 30)).save(root / "latin.jpg")
    (root / "latin.txt").write_bytes(b"Tr\xe8s belle lumi\xe8re\nGood crop.\n")
    (root / "notes.md").write_text("not a photo")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 junk")

    spec = DatasetSpec(name="mine", format="folder", root=root)
    said: list[str] = []
    result = ingest_dataset(spec, workers=1, echo=said.append)
    d = dataset_dir("mine")
    images = pq.read_table(d / "images.parquet").to_pylist()
    comments = pq.read_table(d / "comments.parquet").to_pylist()
    quarantine = pq.read_table(d / "quarantine.parquet").to_pylist()
    assert sorted(i["image_id"] for i in images) == ["cat.PNG", "latin.jpg", "trip/lake.jpg"]
    assert {i["split"] for i in images} == {"test"}
    assert [(c["image_id"], c["text"]) for c in comments if c["image_id"] != "latin.jpg"] == [
        ("trip/lake.jpg", "Strong leading lines."), ("trip/lake.jpg", "Horizon is tilted.")]
    assert [c["text"] for c in comments if c["image_id"] == "latin.jpg"] == ["Good crop."]
    assert {(q["image_id"], q["reason"]) for q in quarantine} == {("broken.jpg", "truncated_image"), ("latin.jpg", "non_utf8")}
    assert any("ignored 1 file" in s for s in said)
    assert result.counts["images_without_comments"] == 1 and "1 images without comments" in said[-1]
    assert Path(json.loads((d / "meta.json").read_text())["root"]) == root.absolute()


@pytest.mark.parametrize("fail_on", ["comments", "quarantine"])
def test_failed_write_leaves_previous_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.jpg")
    spec = DatasetSpec(name="f", format="folder", root=root)
    ingest_dataset(spec, echo=lambda s: None)
    d = dataset_dir("f")
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.suffix in (".parquet", ".json")}
    Image.new("RGB", (8, 8)).save(root / "b.jpg")

    import stages.ingest.run as run

    real = run.pq.write_table

    def flaky(table, where, *a, **k):
        if table.schema.names == run.TABLES[fail_on].names:
            raise KeyboardInterrupt("killed while writing")
        return real(table, where, *a, **k)

    monkeypatch.setattr(run.pq, "write_table", flaky)
    with pytest.raises(KeyboardInterrupt):
        ingest_dataset(spec, echo=lambda s: None)
    after = {p.name: p.read_bytes() for p in d.iterdir() if p.suffix in (".parquet", ".json")}
    assert {k: after[k] for k in before if k != "image_cache.parquet"} == \
        {k: v for k, v in before.items() if k != "image_cache.parquet"}
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(run.pq, "write_table", real)
    result = ingest_dataset(spec, echo=lambda s: None)
    assert not result.up_to_date and result.counts["images"] == 2


def test_replaced_image_is_rechecked(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (10, 10)).save(root / "a.jpg")
    spec = DatasetSpec(name="r", format="folder", root=root)
    ingest_dataset(spec, echo=lambda s: None)
    Image.new("RGB", (30, 10), (200, 0, 0)).save(root / "a.jpg")  # same path, new bytes
    assert not ingest_dataset(spec, echo=lambda s: None).up_to_date
    (row,) = pq.read_table(dataset_dir("r") / "images.parquet").to_pylist()
    assert (row["width"], row["sha256"]) == (30, hashlib.sha256((root / "a.jpg").read_bytes()).hexdigest())


def _bytes_name(directory: Path, raw: bytes) -> Path:
    """A path in ``directory`` whose file name is the raw bytes ``raw`` (not valid UTF-8), as the OS gives it."""
    return directory / os.fsdecode(raw)


def test_file_name_not_utf8_is_quarantined_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (20, 10)).save(root / "good.jpg")
    Image.new("RGB", (20, 10)).save(_bytes_name(root, b"caf\xe9.jpg"))  # Latin-1 name from an old camera / zip
    _bytes_name(root, b"caf\xe9.txt").write_text("A reference.\n")
    spec = DatasetSpec(name="names", format="folder", root=root)
    said: list[str] = []
    result = ingest_dataset(spec, echo=said.append)
    d = dataset_dir("names")
    assert [i["image_id"] for i in pq.read_table(d / "images.parquet").to_pylist()] == ["good.jpg"]
    (q,) = pq.read_table(d / "quarantine.parquet").to_pylist()
    assert (q["source"], q["reason"]) == ("caf\\xe9.jpg", "bad_filename") and "UTF-8" in q["detail"]
    assert "bad_filename 1" in said[-1] and result.counts["quarantined"] == 1
    assert ingest_dataset(spec, echo=said.append).up_to_date  # the fingerprint hashes such names too


def test_links_out_of_the_root_are_quarantined_unread_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stages.ingest.validate as validate

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (20, 10), (200, 0, 0)).save(outside / "real.jpg")
    (outside / "secret.txt").write_text("SECRET line of a file outside the root\n")
    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (20, 10)).save(root / "a.jpg")
    (root / "out.jpg").symlink_to(outside / "real.jpg")  # a valid image, but outside
    (root / "gone.jpg").symlink_to(outside / "missing.jpg")  # dangling, outside
    (root / "inside.jpg").symlink_to(root / "a.jpg")  # a link within the root is fine
    (root / "a.txt").symlink_to(outside / "secret.txt")  # a sidecar linking out
    opened: list[Path] = []
    real_inspect = validate.inspect_image
    monkeypatch.setattr(validate, "inspect_image", lambda path, *a: opened.append(Path(path)) or real_inspect(path, *a))

    spec = DatasetSpec(name="links", format="folder", root=root)
    said: list[str] = []
    ingest_dataset(spec, echo=said.append)
    d = dataset_dir("links")
    assert sorted(i["image_id"] for i in pq.read_table(d / "images.parquet").to_pylist()) == ["a.jpg", "inside.jpg"]
    quarantine = pq.read_table(d / "quarantine.parquet").to_pylist()
    assert sorted((q["image_id"], q["reason"]) for q in quarantine) == [
        ("a.jpg", "outside_root"), ("gone.jpg", "outside_root"), ("out.jpg", "outside_root")]
    assert "allow_external_links" in quarantine[0]["detail"] and "outside_root 3" in said[-1]
    assert {p.name for p in opened} == {"a.jpg", "inside.jpg"}  # the targets outside were never opened
    assert not any("SECRET" in c["text"] for c in pq.read_table(d / "comments.parquet").to_pylist())

    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(f"datasets:\n  links: {{format: folder, root: {root}, allow_external_links: true}}\n")
    ingest_dataset(load_manifest(manifest).dataset("links"), echo=said.append)  # the setting changes the result
    images = {i["image_id"]: i for i in pq.read_table(d / "images.parquet").to_pylist()}
    assert sorted(images) == ["a.jpg", "inside.jpg", "out.jpg"]
    assert images["out.jpg"]["sha256"] == hashlib.sha256((outside / "real.jpg").read_bytes()).hexdigest()
    assert any("SECRET" in c["text"] for c in pq.read_table(d / "comments.parquet").to_pylist())
    assert [q["reason"] for q in pq.read_table(d / "quarantine.parquet").to_pylist()] == ["missing_image"]


def test_link_to_a_folder_outside_is_outside_root(tmp_path: Path) -> None:
    """Annotation formats name files under linked folders too: the folder's real place counts."""
    outside = tmp_path / "disk2"
    outside.mkdir()
    Image.new("RGB", (20, 10)).save(outside / "x.jpg")
    root = tmp_path / "syn"
    root.mkdir()
    (root / "images").symlink_to(outside, target_is_directory=True)
    row = {"image_id": "x", "split": "train", "file": "images/x.jpg", "references": ["Nice."]}
    (root / "annotations.jsonl").write_text(json.dumps(row) + "\n")
    spec = DatasetSpec(name="syn", format="synthetic", root=root, options={"generate": False})
    ingest_dataset(spec, echo=lambda s: None)
    assert [q["reason"] for q in pq.read_table(dataset_dir("syn") / "quarantine.parquet").to_pylist()] == ["outside_root"]
    allowed = DatasetSpec(name="syn", format="synthetic", root=root, options={"generate": False},
                          allow_external_links=True)
    ingest_dataset(allowed, echo=lambda s: None)
    assert [i["image_id"] for i in pq.read_table(dataset_dir("syn") / "images.parquet").to_pylist()] == ["x"]


def test_comment_length_is_capped_with_the_full_text_in_quarantine(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (20, 10)).save(root / "a.jpg")
    huge = ("lovely light " * 80_000).strip()  # ~1 MB on one line
    (root / "a.txt").write_text(f"{huge}\nShort and fine.\n")
    said: list[str] = []
    result = ingest_dataset(DatasetSpec(name="long", format="folder", root=root), echo=said.append)
    d = dataset_dir("long")
    texts = [c["text"] for c in pq.read_table(d / "comments.parquet").to_pylist()]
    assert len(texts) == 2 and texts[1] == "Short and fine."
    assert len(texts[0]) <= MAX_COMMENT_CHARS and huge.startswith(texts[0]) and texts[0].endswith("light")
    assert len(texts[0]) > MAX_COMMENT_CHARS - len("lovely light ")  # cut at the last word boundary before the cap
    (q,) = pq.read_table(d / "quarantine.parquet").to_pylist()
    assert (q["image_id"], q["reason"], q["detail"]) == ("a.jpg", "comment_too_long", huge)
    assert result.counts["comments_cut"] == 1 and f"1 cut to {MAX_COMMENT_CHARS:,} characters" in said[-1]
    # a per-dataset cap from the manifest; a word longer than the cap is cut inside it
    capped = DatasetSpec(name="long", format="folder", root=root, max_comment_chars=5)
    ingest_dataset(capped, echo=said.append)
    assert [c["text"] for c in pq.read_table(d / "comments.parquet").to_pylist()] == ["lovel", "Short"]
