"""Stage-2 data: demo tokenizer, chat formatting + loss masks, the streaming dataset, the collator.

Oracles: the tokenizer's own rendering of the whole conversation as one string, ChatML as
published, transformers' ``get_optimal_tiled_canvas`` for tile counts, and the maps we wrote
into a real SaliencyStore.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

from pipeline.manifest import Manifest, load_manifest
from pipeline.paths import dataset_dir, saliency_root
from storage.atomic import write_json_atomic, write_parquet_atomic
from storage.images import sha256_file
from storage.tables import COMMENTS_SCHEMA, IMAGES_SCHEMA

WORDS = ["lovely light", "strong composition", "the horizon is tilted", "colours feel muted",
         "sharp focus on the eyes", "crop tighter on the subject", "nice leading lines", "too much noise"]
SIZES = [(64, 48), (40, 90), (56, 56), (120, 40), (48, 64), (70, 70)]


# ---------------------------------------------------------------- toy data (also used by test_finetune_train)


def make_toy(tmp: Path, name: str = "toy", comments_per_image: int = 2, n_test: int = 1) -> list[str]:
    """A tiny ingested dataset: coloured images of several aspect ratios + canonical tables."""
    root = tmp / f"{name}_images"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, comments, shas = [], [], []
    for i, (w, h) in enumerate(SIZES):
        path = root / f"img{i}.png"
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        sha = sha256_file(path)
        shas.append(sha)
        split = "test" if i >= len(SIZES) - n_test else "train"
        images.append({"image_id": f"i{i}", "split": split, "path": path.name, "width": w, "height": h,
                       "sha256": sha, "score": None})
        for j in range(comments_per_image):
            text = f"{WORDS[(i + j) % len(WORDS)]} and {WORDS[(3 * i + j + 1) % len(WORDS)]}."
            comments.append({"image_id": f"i{i}", "comment_id": f"c{i}_{j}", "text": text, "aspect": None})
    out = dataset_dir(name)
    write_parquet_atomic(out / "images.parquet", pa.Table.from_pylist(images, schema=IMAGES_SCHEMA))
    write_parquet_atomic(out / "comments.parquet", pa.Table.from_pylist(comments, schema=COMMENTS_SCHEMA))
    write_json_atomic(out / "meta.json", {"root": str(root), "format": "folder"})
    return shas


def make_manifest(tmp: Path, name: str = "toy") -> Path:
    """A manifest whose EAT checkpoint is a dummy file (it only feeds the store fingerprint)."""
    ckpt = tmp / "eat.safetensors"
    ckpt.write_bytes(b"not a real checkpoint")
    path = tmp / "manifest.yaml"
    path.write_text(f"datasets:\n  {name}:\n    format: folder\n    root: {tmp / (name + '_images')}\n"
                    f"models:\n  eat:\n    checkpoint: {ckpt}\n")
    return path


def make_store(
    manifest: Manifest, shas: list[str], shard_rows: int = 4, maps: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write one known 14x14 map per image (random, or from ``maps``) into a real SaliencyStore; returns sha -> map."""
    from storage.saliency_store import LEDGER_SCHEMA, SaliencyStore, eat_store_fingerprint

    fingerprint, _ = eat_store_fingerprint(manifest)
    store = SaliencyStore.open(saliency_root(), fingerprint, map_shape=(14, 14), shard_rows=shard_rows)
    rng = np.random.default_rng(1)
    maps = {sha: rng.random((14, 14)).astype(np.float32) * 5 for sha in shas} | (maps or {})
    for shard, rows in store.plan([(sha, sha[:8]) for sha in shas]).items():
        block = np.zeros((shard_rows, 14, 14), np.float32)
        for r in rows:
            block[r.row - shard * shard_rows] = maps[r.sha256]
        store.write_shard(shard, block, np.zeros(shard_rows), np.full(shard_rows, 5.0))
        store.commit_shard(shard, pa.Table.from_pylist(
            [{"shard": shard, "row": r.row, "sha256": r.sha256, "source": r.source, "reason": None, "detail": None}
             for r in rows], schema=LEDGER_SCHEMA))
    return maps


@pytest.fixture
def tok():
    from stages.families.internvl.tokenizer import train_bpe

    return train_bpe([f"{a}, {b}." for a in WORDS for b in WORDS], vocab_size=300)


@pytest.fixture
def toy(tmp_path: Path):
    shas = make_toy(tmp_path)
    manifest = load_manifest(make_manifest(tmp_path))
    return manifest, shas


# ---------------------------------------------------------------- tokenizer + prompting


def test_tokenizer_round_trip_and_special_tokens(tok, tmp_path: Path) -> None:
    from stages.families.internvl.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, load_tokenizer
    from stages.families.text import save_tokenizer

    text = "Strong composition, but the horizon is tilted! Ünïcode ✓ 123"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE is lossless
    for special in (IMG_START, IMG_END, IMG_CONTEXT, "<|im_start|>", "<|im_end|>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == special
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    # ChatML as published (Qwen2 / InternVL2.5+): <|im_start|>role\ncontent<|im_end|>\n
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    save_tokenizer(tok, tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)


def test_encode_example_matches_whole_string_tokenisation(tok) -> None:
    from stages.families.internvl.prompting import encode_example, prompt_ids
    from stages.families.text import IGNORE, PROMPT

    critique = "Nice leading lines, crop tighter on the subject."
    n = 7
    enc = encode_example(tok, n, critique)
    image = "<img>" + "<IMG_CONTEXT>" * n + "</img>"
    whole = f"<|im_start|>user\n{image}\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n{critique}<|im_end|>"
    assert enc.input_ids == tok(whole, add_special_tokens=False)["input_ids"]
    k = len(prompt_ids(tok, n))
    assert enc.input_ids[:k] == prompt_ids(tok, n)  # generation prompt = training prefix
    assert all(x == IGNORE for x in enc.labels[:k])
    assert enc.labels[k:] == enc.input_ids[k:]
    assert tok.decode(enc.labels[k:]) == critique + "<|im_end|>"
    assert enc.input_ids.count(tok.convert_tokens_to_ids("<IMG_CONTEXT>")) == n
    short = encode_example(tok, n, critique, max_length=k + 3)
    assert len(short.input_ids) == k + 3 and short.input_ids[-1] == tok.eos_token_id


# ---------------------------------------------------------------- dataset + collator


def _dataset(toy, tok, **kw):
    from stages.families.internvl.dataset import CritiqueDataset, TileSpec
    from storage.saliency_store import current_store

    manifest, _ = toy
    store = kw.pop("store", None) or current_store(manifest)
    spec = TileSpec(tile_size=28, max_tiles=4, tokens_per_tile=4)
    return CritiqueDataset("toy", "train", tok, spec, store, **kw)


def test_dataset_items_tiles_saliency_and_tokens(toy, tok) -> None:

    manifest, shas = toy
    maps = make_store(manifest, shas)
    data = _dataset(toy, tok)
    assert len(data) == 5 * 2  # one example per (train image, comment)
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    for i in range(len(data)):
        item = data[i]
        w, h = SIZES[i // 2]
        cols, rows = get_optimal_tiled_canvas((h, w), (28, 28), 1, 4)
        n_tiles = cols * rows + (1 if cols * rows > 1 else 0)
        assert item["pixel_values"].shape == (n_tiles, 3, 28, 28)
        assert torch.equal(item["saliency_map"], torch.from_numpy(maps[shas[i // 2]]))  # the stored map, raw
        assert item["tile_grid"] == (cols, rows, int(cols * rows > 1))
        assert item["input_ids"].count(ctx) == 4 * n_tiles
        assert tok.decode([t for t in item["labels"] if t != -100]).endswith("<|im_end|>")


def test_missing_saliency_names_stage_or_counts(toy, tok) -> None:
    from stages.families.data import MissingSaliencyError

    manifest, shas = toy
    make_store(manifest, shas[:2])  # images 2..4 of the train split have no map yet
    with pytest.raises(MissingSaliencyError, match=r"ase-mllm saliency"):
        _dataset(toy, tok)
    data = _dataset(toy, tok, allow_missing_saliency=True)
    assert data.missing_saliency == 3
    assert data[4]["saliency_map"] is None  # image 2: no map, i.e. uniform


def test_constant_stored_map_is_uniform_like_a_missing_one(toy, tok) -> None:
    """One rule for "no saliency": a stored all-zero map trains on the same all-ones tiles as a missing map."""
    from stages.families.internvl.collate import Collator
    from stages.families.internvl.model import IASInternVLModel

    manifest, shas = toy
    make_store(manifest, shas[:2], maps={shas[1]: np.zeros((14, 14), np.float32)})
    data = _dataset(toy, tok, allow_missing_saliency=True)
    batch = Collator(tok.pad_token_id)([data[2], data[4]])  # image 1 (zeros), image 2 (absent)
    tiles = IASInternVLModel.saliency_tiles(batch["pixel_values"], batch["saliency_maps"],
                                            batch["saliency_map_sizes"], batch["tile_grids"])
    assert tiles.shape[0] == batch["pixel_values"].shape[0] and torch.equal(tiles, torch.ones_like(tiles))


def test_collator_pads_and_keeps_tile_order(toy, tok) -> None:
    from stages.families.internvl.collate import Collator

    manifest, shas = toy
    make_store(manifest, shas)
    data = _dataset(toy, tok)
    items = [data[i] for i in (0, 3, 6)]
    batch = Collator(tok.pad_token_id, keep_sample_ids=True)(items)
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((batch["input_ids"] == ctx).sum()) == batch["pixel_values"].shape[0] * 4  # InternVL's invariant
    torch.testing.assert_close(batch["pixel_values"], torch.cat([e["pixel_values"] for e in items]))
    assert batch["pixel_values"].dtype == torch.uint8  # tiles travel as bytes; the model normalises them
    assert batch["tile_grids"] == [tuple(e["tile_grid"]) for e in items]  # host lists: they fix shapes
    for b, e in enumerate(items):  # each map in the top-left corner of its zero-padded slot
        h, w = batch["saliency_map_sizes"][b]
        assert torch.equal(batch["saliency_maps"][b, :h, :w], e["saliency_map"])
        assert not batch["saliency_maps"][b, h:].any() and not batch["saliency_maps"][b, :, w:].any()
    for row, e in enumerate(items):
        k = len(e["input_ids"])
        assert batch["input_ids"][row, :k].tolist() == e["input_ids"]
        assert batch["attention_mask"][row].sum() == k and (batch["labels"][row, k:] == -100).all()
    assert batch["sample_ids"] == [0, 3, 6]
    # the loss's positions, made on the host: every position whose next token is labelled, and that token
    flat_labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
    expected = [i for i, t in enumerate(flat_labels.tolist()) if t != -100]
    assert batch["label_positions"].tolist() == expected
    assert batch["label_targets"].tolist() == [flat_labels[i].item() for i in expected]


def test_loader_workers_and_rank_shares_are_disjoint(toy, tok) -> None:
    from stages.families.internvl.collate import Collator

    manifest, shas = toy
    make_store(manifest, shas)
    data = _dataset(toy, tok)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(data, batch_size=2, sampler=sampler, num_workers=2,
                            collate_fn=Collator(tok.pad_token_id, keep_sample_ids=True))
        seen.append([i for b in loader for i in b["sample_ids"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(data)))
