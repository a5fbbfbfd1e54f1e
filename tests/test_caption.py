"""``caption``: folders expanded, per-file errors while the rest proceed, saliency reused from the
store by sha256 (its stored score) or computed with the EAT (score = the EAT's own forward), and the
critique equals batch-1 generation with the same run and map."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.manifest import load_manifest
from storage.images import open_rgb, sha256_file
from test_finetune_data import make_store, make_toy
from test_generate import make_run


def _setup(tmp_path: Path, constant_img0: bool = False):
    from stages.saliency.eat import build_eat

    make_toy(tmp_path)
    torch.manual_seed(0)
    eat = build_eat("nano")
    ckpt = tmp_path / "eat_nano.safetensors"
    save_file({k: v.contiguous() for k, v in eat.state_dict().items()}, str(ckpt))
    path = tmp_path / "manifest.yaml"
    path.write_text(f"datasets:\n  toy:\n    format: folder\n    root: {tmp_path / 'toy_images'}\n"
                    f"models:\n  eat:\n    variant: nano\n    checkpoint: {ckpt}\n")
    manifest = load_manifest(path)
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i in (0, 1):
        shutil.copy(tmp_path / "toy_images" / f"img{i}.png", photos / f"img{i}.png")
    (photos / "sub" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("not an image")
    sha0 = sha256_file(photos / "img0.png")
    constant = {sha0: np.zeros((14, 14), np.float32)} if constant_img0 else None
    maps = make_store(manifest, [sha0], maps=constant)  # img0 in the store, img1 not
    make_run("toy", "r")
    return manifest, photos, maps, eat


def test_caption_files_store_computed_and_errors(tmp_path: Path) -> None:
    from stages.report.caption import caption_files
    from stages.report.generate import DecodeConfig, load_run
    from stages.saliency.eat import eat_score, preprocess

    manifest, photos, maps, eat = _setup(tmp_path)
    out = tmp_path / "out"
    decode = DecodeConfig(max_new_tokens=12)
    summary = caption_files([photos, tmp_path / "missing.png"], manifest, out, run="r", decode=decode, progress=False)
    rows = {Path(r.path).name: r for r in summary.rows}
    assert set(rows) == {"img0.png", "img1.png", "bad.jpg", "missing.png"}
    assert rows["bad.jpg"].error.startswith(("not_an_image", "corrupt_image", "truncated_image"))
    assert rows["missing.png"].error.startswith("missing_image")

    stored, computed = rows["img0.png"], rows["img1.png"]
    assert stored.saliency == "store" and stored.aesthetic_score == 5.0  # the score make_store wrote
    assert computed.saliency == "computed"
    with torch.no_grad():  # oracle: the EAT's own forward on the same image
        expected = float(eat_score(eat(preprocess(open_rgb(photos / "img1.png"))[None]))[0])
    assert computed.aesthetic_score == np.float32(expected) or abs(computed.aesthetic_score - expected) < 1e-4

    captioner, _, _ = load_run("toy", "r")
    sal = maps[sha256_file(photos / "img0.png")]
    alone = captioner.generate([captioner.prepare(open_rgb(photos / "img0.png"), sal)], decode)[0]
    assert stored.critique == alone and computed.critique is not None

    for r in (stored, computed):
        heat = Image.open(out / r.heatmap)
        assert heat.size == open_rgb(Path(r.path)).size
    lines = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {x["path"] for x in lines} == {r.path for r in summary.rows}
    table = list(csv.DictReader((out / "captions.csv").open()))
    assert [t["critique"] for t in table if t["path"].endswith("img0.png")] == [alone]
    html = (out / "index.html").read_text()
    assert html.count('class="item"') == 2 and "bad.jpg" in html


def test_constant_store_map_captions_like_no_map(tmp_path: Path) -> None:
    """caption follows the one "no saliency" rule: an all-zero stored map gives the uniform-map critique."""
    from stages.report.caption import caption_files
    from stages.report.generate import DecodeConfig, load_run

    manifest, photos, _, _ = _setup(tmp_path, constant_img0=True)
    decode = DecodeConfig(max_new_tokens=12)
    summary = caption_files([photos / "img0.png"], manifest, tmp_path / "out", run="r", decode=decode, progress=False)
    (row,) = summary.rows
    captioner, _, _ = load_run("toy", "r")
    uniform = captioner.generate([captioner.prepare(open_rgb(photos / "img0.png"), None)], decode)[0]
    assert row.saliency == "store" and row.critique == uniform


def test_caption_dir_counts_the_files_ingest_counts(tmp_path: Path) -> None:
    """One rule for caption DIR and ingest: hidden files and folders are skipped by both; a name that is not
    valid UTF-8 is an error row (escaped) in caption and a bad_filename quarantine entry in ingest."""
    import os

    import pyarrow.parquet as pq

    from pipeline.manifest import DatasetSpec
    from pipeline.paths import dataset_dir
    from stages.ingest.run import ingest_dataset
    from stages.report.caption import caption_files
    from stages.report.generate import DecodeConfig

    manifest, photos, _, _ = _setup(tmp_path)
    (photos / ".cache").mkdir()
    for hidden in (photos / ".img0.png", photos / "sub" / "._img1.png", photos / ".cache" / "img0.png"):
        shutil.copy(photos / "img0.png", hidden)
    shutil.copy(photos / "img1.png", photos / os.fsdecode(b"caf\xe9.png"))
    out = tmp_path / "out"
    summary = caption_files([photos], manifest, out, run="r", decode=DecodeConfig(max_new_tokens=4), progress=False)
    captioned = {str(Path(r.path).relative_to(photos)) for r in summary.rows}
    assert captioned == {"img0.png", "img1.png", "sub/bad.jpg", "caf\\xe9.png"}
    (bad,) = [r for r in summary.rows if r.path.endswith("caf\\xe9.png")]
    assert bad.error.startswith("bad_filename") and bad.critique is None
    assert len((out / "captions.jsonl").read_text().splitlines()) == 4 and "caf\\xe9.png" in (out / "index.html").read_text()

    ingest_dataset(DatasetSpec(name="same", format="folder", root=photos), echo=lambda s: None)
    d = dataset_dir("same")
    ingested = {r["image_id"] for r in pq.read_table(d / "images.parquet").to_pylist()}
    ingested |= {r["source"] for r in pq.read_table(d / "quarantine.parquet").to_pylist()}
    assert ingested == captioned
