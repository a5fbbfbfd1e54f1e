"""Stage-2 loader benchmark: cost of saliency in the loader, and loader throughput vs model step time.

Prints (1) samples/s with saliency (the image's raw map read from the store; the model cuts it into
tiles on its device) / samples/s without (no map, no store read; aim >= 0.9) at the paper's tiling
(448 px tiles, up to 12 + thumbnail) and at the demo model's, samples read alternately (with, without,
in shuffled order, every store read fetching its one map as in a large shuffled store: no shard
cache), two rounds, and (2) samples/s
of one loader worker against the tiny model's training step (saliency tiles made in the step), i.e.
how many DataLoader workers keep that model fed, and (3) the bytes one 41-tile sample (448 px, 8 x 5 + thumbnail)
sends from a loader worker through shared memory: uint8 tiles now, float32 pixel values before (the model
normalises the tiles on its device). Run: ``.venv/bin/python tests/bench/loader.py``.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
_SCRATCH: list[str] = []  # temp dirs this bench made, removed at exit
if "ASE_WORK" not in os.environ:
    _SCRATCH.append(tempfile.mkdtemp(prefix="ase-bench-"))
    os.environ["ASE_WORK"] = _SCRATCH[0]
torch.set_num_threads(1)

from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.paths import dataset_dir  # noqa: E402
from storage.atomic import write_json_atomic, write_parquet_atomic  # noqa: E402
from storage.images import sha256_file  # noqa: E402
from storage.tables import COMMENTS_SCHEMA, IMAGES_SCHEMA  # noqa: E402
from test_finetune_data import WORDS, make_manifest, make_store  # noqa: E402

N_IMAGES = 16
SIZES = [(1024, 768), (768, 1024), (1200, 800), (900, 900)]


def photo_dataset(tmp: Path) -> list[str]:
    """``N_IMAGES`` camera-sized JPEGs (smooth gradients + noise) and one comment each."""
    root = tmp / "toy_images"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, comments, shas = [], [], []
    for i in range(N_IMAGES):
        w, h = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200
        pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        path = root / f"p{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        shas.append(sha256_file(path))
        images.append({"image_id": f"p{i}", "split": "train", "path": path.name, "width": w, "height": h,
                       "sha256": shas[-1], "score": None})
        comments.append({"image_id": f"p{i}", "comment_id": "c0", "text": WORDS[i % len(WORDS)], "aspect": None})
    out = dataset_dir("toy")
    write_parquet_atomic(out / "images.parquet", pa.Table.from_pylist(images, schema=IMAGES_SCHEMA))
    write_parquet_atomic(out / "comments.parquet", pa.Table.from_pylist(comments, schema=COMMENTS_SCHEMA))
    write_json_atomic(out / "meta.json", {"root": str(root), "format": "folder"})
    return shas


def rate(data, n: int) -> float:
    """Samples/s of ``data[i]`` in this process (= one DataLoader worker)."""
    data[0]  # warm caches (store index, zarr metadata)
    t = time.perf_counter()
    for i in range(n):
        data[i % len(data)]
    return n / (time.perf_counter() - t)


def paired_rates(first, second, n: int, seed: int) -> tuple[float, float]:
    """Samples/s of ``first[i]`` and ``second[i]`` read item by item in one shuffled order, each pair in
    alternating order (the second read of an image is the warmer one)."""
    first[0], second[0]  # warm caches (store index, zarr metadata)
    spent = [0.0, 0.0]
    for j, i in enumerate(np.random.default_rng(seed).integers(0, len(first), n).tolist()):
        for k in ((0, 1) if j % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            (first, second)[k][i]
            spent[k] += time.perf_counter() - t
    return n / spent[0], n / spent[1]


def main() -> None:
    from stages.families.internvl.collate import Collator
    from stages.families.internvl.dataset import CritiqueDataset, TileSpec
    from stages.families.internvl.model import build_tiny_model, tokens_per_tile
    from stages.families.internvl.tokenizer import IMG_CONTEXT, train_bpe
    from storage import saliency_store
    from storage.saliency_store import current_store

    saliency_store.SEQUENTIAL_READS = 1 << 62  # one map per read, as random reads of a large store

    tmp = Path(tempfile.mkdtemp(prefix="ase-bench-data-"))
    _SCRATCH.append(str(tmp))
    shas = photo_dataset(tmp)
    manifest = load_manifest(make_manifest(tmp))
    make_store(manifest, shas)
    tok = train_bpe(WORDS * 4, vocab_size=300)
    model = build_tiny_model("tiny", vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT))
    demo = TileSpec(tile_size=224, max_tiles=12, tokens_per_tile=tokens_per_tile(model.config))
    paper = TileSpec(tile_size=448, max_tiles=12, tokens_per_tile=256)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for label, spec in (("paper tiling 448 px x <=12+1", paper), ("demo tiling 224 px x <=12+1", demo)):
        with_sal = CritiqueDataset("toy", "train", tok, spec, current_store(manifest))
        without = CritiqueDataset("toy", "train", tok, spec, None, allow_missing_saliency=True)
        for round_ in (1, 2):
            r_with, r_without = paired_rates(with_sal, without, 4 * N_IMAGES, seed=round_)
            print(f"{label}, round {round_}: {r_with:.2f} samples/s with saliency, {r_without:.2f} without "
                  f"-> ratio {r_with / r_without:.3f} (aim >= 0.9)")

    data = CritiqueDataset("toy", "train", tok, demo, current_store(manifest))
    per_worker = rate(data, 2 * N_IMAGES)
    batch = Collator(tok.pad_token_id)([data[i] for i in range(4)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    step = float(np.median(times[1:]))
    model_rate = 4 / step
    from stages.families.internvl.tiling import plan_tiles, tile_image

    forty = plan_tiles(1600, 1000, 448, 1, 40)
    tiles = tile_image(Image.fromarray(np.zeros((1000, 1600, 3), np.uint8)), forty, 448)  # what a worker ships
    before = tiles.numel() * torch.finfo(torch.float32).bits // 8  # the same tiles as float32 pixel values
    print(f"one {forty.num_tiles}-tile sample (448 px) through a loader worker: {tiles.nbytes / 1e6:.1f} MB of "
          f"{tiles.dtype} tiles, before {before / 1e6:.1f} MB of float32 pixel values ({before / tiles.nbytes:.0f}x)")
    print(f"tiny model train step (batch 4, {batch['pixel_values'].shape[0]} tiles, CPU 1 thread): {step * 1000:.0f} ms "
          f"= {model_rate:.1f} samples/s; one loader worker: {per_worker:.1f} samples/s "
          f"-> {max(1, int(np.ceil(model_rate / per_worker)))} worker(s) keep it fed")


if __name__ == "__main__":
    try:
        main()
    finally:
        for d in _SCRATCH:
            shutil.rmtree(d, ignore_errors=True)
