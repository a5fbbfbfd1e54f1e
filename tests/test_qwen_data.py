"""The Qwen2.5-VL family's data path against transformers' own Qwen2.5-VL processor (image processor +
tokenizer + chat template -> pixel_values, image_grid_thw, input_ids, mm_token_type_ids), Qwen2.5-VL's
published prompt layout, and the maps written into a real SaliencyStore."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from pipeline.manifest import load_manifest
from pipeline.paths import dataset_dir
from storage.atomic import write_parquet_atomic
from storage.images import ImageError, open_rgb
from storage.tables import IMAGES_SCHEMA, image_root, read_table
from test_finetune_data import SIZES, WORDS, make_manifest, make_store, make_toy


@pytest.fixture
def tok():
    from stages.families.qwen.data import train_tokenizer

    return train_tokenizer([f"{a}, {b}." for a in WORDS for b in WORDS], vocab_size=300)


@pytest.fixture
def toy(tmp_path: Path):
    shas = make_toy(tmp_path)
    return load_manifest(make_manifest(tmp_path)), shas


def _spec():
    from stages.families.qwen.data import ImageSpec

    return ImageSpec(min_pixels=56 * 56, max_pixels=4 * 224 * 224)


def _dataset(manifest, tok, **kw):
    from stages.families.qwen.data import QwenCritiqueDataset
    from storage.saliency_store import current_store

    store = kw.pop("store", None) or current_store(manifest)
    return QwenCritiqueDataset("toy", "train", tok, _spec(), store, **kw)


def test_tokenizer_special_tokens_and_qwen25vl_prompt_layout(tok, tmp_path: Path) -> None:
    from stages.families import FAMILIES
    from stages.families.qwen.data import CHAT_TEMPLATE, IMAGE_PAD, load_tokenizer, prompt_ids
    from stages.families.text import PROMPT

    for special in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == special
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # Qwen2.5-VL's layout: default system turn, then the image inside vision_start / vision_end
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    whole = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
             + IMAGE_PAD * 5 + f"<|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_ids(tok, 5) == tok(whole, add_special_tokens=False)["input_ids"]
    # saved and reloaded, and a release-style directory whose template lives in chat_template.json
    saved = FAMILIES["qwen2_5_vl"].dataset_tokenizer([], tmp_path / "tok", 2048)
    assert saved.chat_template == CHAT_TEMPLATE
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "release")
    (tmp_path / "release" / "chat_template.json").write_text(__import__("json").dumps({"chat_template": CHAT_TEMPLATE}))
    assert load_tokenizer(tmp_path / "release").chat_template == CHAT_TEMPLATE
    with pytest.raises(ValueError, match="Qwen2.5-VL image tokens"):
        from stages.families.internvl.tokenizer import train_bpe

        train_bpe(WORDS, vocab_size=300).save_pretrained(tmp_path / "internvl")
        load_tokenizer(tmp_path / "internvl")


def test_batch_equals_the_qwen25vl_processors_output(toy, tok) -> None:
    """Two odd-sized images through our dataset + collator vs transformers' Qwen2.5-VL processor on the same
    images and the same conversation: identical pixel_values, grids, prompt tokens and token types."""
    from stages.families.text import PROMPT
    from stages.families.qwen.data import CHAT_TEMPLATE, IMAGE_PAD, QwenCollator

    manifest, shas = toy
    make_store(manifest, shas)
    data = _dataset(manifest, tok)
    items = [data[0], data[2]]  # images 0 (64 x 48) and 1 (40 x 90)
    batch = QwenCollator(tok.pad_token_id, tok.convert_tokens_to_ids(IMAGE_PAD))(items)
    processor = Qwen2_5_VLProcessor(image_processor=_spec().processor(), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    root = image_root("toy")
    images = [open_rgb(root / f"img{i}.png") for i in (0, 1)]
    ref = processor(text=[text, text], images=images, return_tensors="pt", padding=True, padding_side="right")
    assert torch.equal(batch["pixel_values"], ref["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], ref["image_grid_thw"])
    for row, item in enumerate(items):
        prompt = int(ref["attention_mask"][row].sum())
        assert batch["input_ids"][row, :prompt].tolist() == ref["input_ids"][row, :prompt].tolist()
        assert batch["mm_token_type_ids"][row, :prompt].tolist() == ref["mm_token_type_ids"][row, :prompt].tolist()
        assert (batch["mm_token_type_ids"][row, prompt:] == 0).all()
        assert (batch["labels"][row, :prompt] == -100).all()
        assert tok.decode([t for t in item["labels"] if t != -100]).endswith("<|im_end|>")
    # odd sizes: the processor's smart resize (multiples of 28, at least 56 x 56 px) gives these patch grids
    assert [tuple(g) for g in ref["image_grid_thw"].tolist()] == [(1, 4, 4), (1, 6, 4)]


def test_items_carry_the_stored_raw_map_and_the_data_derived_length(toy, tok) -> None:
    from stages.families.qwen.data import encode_example
    from stages.families.data import SequenceLengthError

    manifest, shas = toy
    maps = make_store(manifest, shas)
    data = _dataset(manifest, tok)
    assert len(data) == 5 * 2
    for i in range(len(data)):
        item = data[i]
        assert torch.equal(item["saliency_map"], torch.as_tensor(maps[shas[i // 2]]))  # raw, as stored
        assert int(item["image_grid_thw"].prod()) == item["pixel_values"].shape[0]
    lengths = [len(data[i]["input_ids"]) for i in range(len(data))]
    assert data.max_length == max(lengths)  # the longest example, known before any item is read
    w, h = SIZES[0]
    n = _spec().image_tokens(w, h)
    critique = data.items[0][2]
    capped = _dataset(manifest, tok, max_length=len(encode_example(tok, n, critique).input_ids) - 2)
    assert capped.truncated >= 1 and len(capped[0]["input_ids"]) == capped.max_length
    with pytest.raises(SequenceLengthError, match="--max-pixels"):
        _dataset(manifest, tok, max_length=20)


def test_missing_and_constant_maps_are_uniform(toy, tok) -> None:
    from stages.families.data import MissingSaliencyError
    from stages.families.qwen.data import IMAGE_PAD, QwenCollator, stack_maps

    manifest, shas = toy
    make_store(manifest, shas[:2], maps={shas[1]: np.zeros((14, 14), np.float32)})
    with pytest.raises(MissingSaliencyError, match="ase-mllm saliency"):
        _dataset(manifest, tok)
    data = _dataset(manifest, tok, allow_missing_saliency=True)
    assert data.missing_saliency == 3 and data[4]["saliency_map"] is None  # image 2: no map
    batch = QwenCollator(tok.pad_token_id, tok.convert_tokens_to_ids(IMAGE_PAD))([data[0], data[2], data[4]])
    maps = batch["saliency_maps"]
    assert maps.shape == (3, 14, 14) and torch.equal(maps[2], torch.ones(14, 14))
    from stages.families.qwen.vit import patch_saliency

    values = patch_saliency(maps, batch["image_grid_thw"], 14, 2).split(batch["image_grid_thw"].prod(-1).tolist())
    assert torch.equal(values[1], torch.ones_like(values[1])) and torch.equal(values[2], torch.ones_like(values[2]))
    assert not torch.equal(values[0], torch.ones_like(values[0]))
    assert torch.equal(stack_maps([None, None]), torch.ones(2, 1, 1))


def test_an_aspect_ratio_the_processor_refuses_is_a_clear_error(toy, tok) -> None:
    """The Qwen2.5-VL processor refuses aspect ratios above 200: training names the image before it starts,
    generation records the image as failed (ImageError) instead of stopping."""
    from stages.families.data import SequenceLengthError
    from stages.families.qwen.data import special_ids
    from stages.families.qwen.model import build_tiny_model
    from stages.families.qwen.captioner import QwenCaptioner

    with pytest.raises(ImageError, match="aspect ratios up to 200"):
        _spec().image_tokens(4020, 20)
    manifest, shas = toy
    make_store(manifest, shas)
    images = read_table("toy", "images").to_pylist()
    images[0]["width"], images[0]["height"] = 4020, 20  # as ingest records such a panorama
    write_parquet_atomic(dataset_dir("toy") / "images.parquet", pa.Table.from_pylist(images, schema=IMAGES_SCHEMA))
    with pytest.raises(SequenceLengthError, match="4020x20: the Qwen2.5-VL image processor takes aspect ratios up"):
        _dataset(manifest, tok)
    model = build_tiny_model("tiny-qwen", vocab_size=len(tok), special_ids=special_ids(tok))
    cap = QwenCaptioner(model, tok, _spec(), torch.device("cpu"))
    assert cap.image_cost(4020, 20) == 0
    with pytest.raises(ImageError, match="aspect_ratio"):
        cap.prepare(Image.new("RGB", (4020, 20)), None)
