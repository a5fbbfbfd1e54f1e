"""ASE-MLLM on Qwen2.5-VL against transformers' own Qwen2.5-VL (same weights), torch's cross-entropy and a
plain greedy loop of full forwards; loading a real-layout Qwen2.5-VL checkpoint; the registered shapes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

from stages.families.qwen.model import (
    IASQwen2_5_VLConfig,
    IASQwen2_5_VLForConditionalGeneration,
    build_tiny_model,
    load_base,
    named_config,
    tiny_config,
)
from stages.families.fusion import cross_attention_parameters

VOCAB = 300
WORDS = ["lovely light", "strong composition", "the horizon is tilted", "colours feel muted"]


def _model(fusion: str = "cross_attention", seed: int = 0) -> IASQwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    return build_tiny_model("tiny-qwen", vocab_size=VOCAB, fusion=fusion).eval()


def _base_config(config: IASQwen2_5_VLConfig) -> Qwen2_5_VLConfig:
    drop = ("model_type", "transformers_version", "ias_fusion", "architectures")
    return Qwen2_5_VLConfig(**{k: v for k, v in config.to_dict().items() if k not in drop})


def _base_with_same_weights(model: IASQwen2_5_VLForConditionalGeneration) -> Qwen2_5_VLForConditionalGeneration:
    base = Qwen2_5_VLForConditionalGeneration(_base_config(model.config)).eval()
    result = base.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    assert set(result.unexpected_keys) == {n for n, _ in cross_attention_parameters(model)}
    return base


def _open_gates(model: torch.nn.Module, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(7)
    for name, p in cross_attention_parameters(model):
        p.data = torch.randn(p.shape, generator=g) * (scale if name.endswith(".gate") else 0.2)


def _batch(model: IASQwen2_5_VLForConditionalGeneration, grids: tuple[tuple[int, int], ...] = ((6, 10), (4, 4)),
           seed: int = 0) -> dict:
    """Left-padded batch [text, vision_start, image_pad x patches/4, vision_end, text], one image per sample."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    rows = [torch.cat([torch.randint(1, 200, (3,), generator=g), torch.tensor([c.vision_start_token_id]),
                       torch.full((h * w // 4,), c.image_token_id), torch.tensor([c.vision_end_token_id]),
                       torch.randint(1, 200, (4 + i,), generator=g)]) for i, (h, w) in enumerate(grids)]
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = r
        attention_mask[i, length - len(r):] = 1
    grid = torch.tensor([[1, h, w] for h, w in grids])
    return dict(input_ids=input_ids, attention_mask=attention_mask,
                mm_token_type_ids=(input_ids == c.image_token_id).int(), image_grid_thw=grid,
                pixel_values=torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g),
                saliency_maps=torch.rand(len(grids), 14, 14, generator=g))


def _without_saliency(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "saliency_maps"}


@pytest.mark.parametrize("fusion", ["none", "cross_attention"])
def test_logits_equal_base_qwen25vl_when_gates_are_zero(fusion: str) -> None:
    model = _model(fusion)
    base = _base_with_same_weights(model)
    batch = _batch(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**_without_saliency(batch)).logits)
        ours = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                        saliency_maps=batch["saliency_maps"], return_dict=True).pooler_output
        theirs = base.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True).pooler_output
    assert len(ours) == 2 and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_open_gates_saliency_changes_logits_and_samples_stay_independent() -> None:
    model = _model()
    _open_gates(model, scale=3.0)
    batch = _batch(model)
    other = batch["saliency_maps"].clone()
    other[1] = torch.rand(14, 14)
    with torch.no_grad():
        a = model(**batch).logits
        b = model(**{**batch, "saliency_maps": other}).logits
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1], atol=1e-3)


def test_loss_is_cross_entropy_on_critique_tokens_only() -> None:
    model = _model()
    _open_gates(model)
    batch = _batch(model)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -3:] = batch["input_ids"][:, -3:]  # left padding: the last 3 tokens are the "critique"
    full = model(**batch).logits  # [B, L, V]
    shifted_logits, shifted_labels = full[:, :-1], labels[:, 1:]
    ref = F.cross_entropy(shifted_logits.reshape(-1, VOCAB).float(), shifted_labels.reshape(-1), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    out = model(**batch, labels=labels)
    keep = shifted_labels != -100
    assert out.logits.shape == (int(keep.sum()), VOCAB)
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    for (name, p), g in zip(model.named_parameters(), ref_grads):
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad.abs().sum() > 0 for n, p in cross_attention_parameters(model) if n.endswith(".gate"))


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    model = _model()
    _open_gates(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["ias_fusion"] == "cross_attention" and saved["model_type"] == "ias_qwen2_5_vl"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, IASQwen2_5_VLForConditionalGeneration)
    batch = _batch(model)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_load_base_reports_only_cross_attention_keys_missing(tmp_path: Path) -> None:
    """A checkpoint saved by transformers' own Qwen2.5-VL (its on-disk layout: ``visual.*``,
    ``model.layers.*``) loads with exactly the new cross-attention parameters missing."""
    torch.manual_seed(3)
    base = Qwen2_5_VLForConditionalGeneration(_base_config(tiny_config("tiny-qwen", VOCAB))).eval()
    base.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("visual.blocks.") for k in keys) and any(k.startswith("model.layers.") for k in keys)
    model, missing = load_base(tmp_path)
    assert missing == sorted(n for n, _ in cross_attention_parameters(model))
    assert len(missing) == base.config.vision_config.depth * 11
    model.eval()
    batch = _batch(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**_without_saliency(batch)).logits)  # starts as the base
    ablation, missing = load_base(tmp_path, fusion="none")
    assert missing == [] and not cross_attention_parameters(ablation)


def test_image_token_count_must_match_patches() -> None:
    model = _model()
    batch = _batch(model)
    with pytest.raises(Exception, match="Image features and image tokens do not match"):
        model(**{**batch, "image_grid_thw": torch.tensor([[1, 6, 10], [1, 4, 8]]),
                 "pixel_values": torch.randn(92, 1176)})


def test_default_trainable_parts_freeze_only_the_vision_base() -> None:
    from stages.finetune.train import PARTS, set_trainable

    model = _model()
    counts = set_trainable(model, ("cross_attention", "projector", "llm"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {name for name, _ in cross_attention_parameters(model)} <= trainable
    merger = {name for name, _ in model.named_parameters() if name.startswith("model.visual.merger.")}
    assert merger <= trainable and counts["projector"] == sum(model.get_parameter(n).numel() for n in merger)
    assert any(name.startswith("model.language_model.") for name in trainable) and "lm_head.weight" not in dict(
        model.named_parameters())  # tied to the embedding in the tiny configs
    assert not any(name.startswith("model.visual.") and ".cross_attention." not in name and name not in merger
                   for name in trainable)
    set_trainable(model, PARTS)
    assert all(p.requires_grad for p in model.parameters())


def test_fsdp_wraps_the_vision_block_and_the_decoder_layer() -> None:
    from stages.finetune.sharding import strategy

    fsdp = strategy("fsdp").training_kwargs(tiny_config("tiny-qwen", VOCAB), gradient_checkpointing=True)["fsdp_config"]
    assert fsdp["transformer_layer_cls_to_wrap"] == ["IASQwenVisionBlock", "Qwen2_5_VLDecoderLayer"]
    ablation = strategy("fsdp").training_kwargs(tiny_config("tiny-qwen", VOCAB, fusion="none"), True)["fsdp_config"]
    assert ablation["transformer_layer_cls_to_wrap"] == ["Qwen2_5_VLVisionBlock", "Qwen2_5_VLDecoderLayer"]


def test_registered_shapes() -> None:
    """qwen2.5-vl-7b: the Qwen2.5-VL-7B-Instruct release's architecture (676 M vision + merger, 7.62 B LLM)."""
    from stages.finetune.plan import Setting, count_parameters

    cfg = named_config("qwen2.5-vl-7b")
    d, mlp, depth = 1280, 3420, 32
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * (d * mlp + mlp) + (mlp * d + d)
    vision = 3 * 2 * 14 * 14 * d + depth * block
    merger = d + (4 * d * 4 * d + 4 * d) + (4 * d * 3584 + 3584)
    h, kv, inter, vocab = 3584, 512, 18944, 152064
    layer = 2 * h + (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter
    llm = 2 * vocab * h + 28 * layer + h
    counts = count_parameters(cfg, Setting()).by_part
    assert (counts["vision"], counts["projector"], counts["llm"]) == (vision, merger, llm)
    assert abs(vision + merger + llm - 8.29e9) < 0.01e9  # the release's 8.29 B parameters
    real = tiny_config("qwen2.5-vl-vision-shape").vision_config
    assert (real.depth, real.hidden_size, real.num_heads, real.intermediate_size) == (32, 1280, 16, 3420)
    assert list(real.fullatt_block_indexes) == [7, 15, 23, 31] and real.window_size == 112


# ---------------------------------------------------------------- generation


def _captioner_parts(seed: int = 0):
    from stages.families.qwen.data import special_ids, train_tokenizer

    tok = train_tokenizer([f"{a}, {b}." for a in WORDS for b in WORDS], vocab_size=300)
    torch.manual_seed(seed)
    model = build_tiny_model("tiny-qwen", vocab_size=len(tok), special_ids=special_ids(tok))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a freshly initialised tiny LLM repeats one token forever; this one does not
        for name, p in model.named_parameters():
            if p.ndim >= 2 or name.endswith("gate"):
                p.add_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval(), tok


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (203, 131), (61, 97)]
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in sizes]


def test_batched_decoding_equals_batch_one_and_a_plain_argmax_loop() -> None:
    from stages.families.qwen.data import ImageSpec
    from stages.report.generate import DecodeConfig
    from stages.families.qwen.captioner import QwenCaptioner

    model, tok = _captioner_parts()
    cap = QwenCaptioner(model, tok, ImageSpec(max_pixels=4 * 224 * 224), torch.device("cpu"))
    rng = np.random.default_rng(1)
    prompts = [cap.prepare(img, rng.random((14, 14))) for img in _images()]
    assert len({len(p.input_ids) for p in prompts}) == 3  # real left padding in the batch
    for decode in (DecodeConfig(max_new_tokens=8), DecodeConfig(max_new_tokens=6, num_beams=3)):
        batched = cap.generate_ids(prompts, decode)
        single = [cap.generate_ids([p], decode)[0] for p in prompts]
        assert batched == single, decode
    assert len({tuple(s) for s in single}) > 1  # outputs depend on the image

    # oracle: greedy as a plain loop of full forwards (no KV cache, no generate, no precomputed features)
    p = prompts[1]
    ids = torch.tensor([p.input_ids])
    with torch.no_grad():
        for _ in range(8):
            types = (ids == model.config.image_token_id).int()
            logits = model(input_ids=ids, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
                           saliency_maps=p.saliency_map[None], mm_token_type_ids=types).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    plain = ids[0, len(p.input_ids):].tolist()
    eos = tok.eos_token_id
    plain = plain[: plain.index(eos) + 1] if eos in plain else plain
    assert cap.generate_ids([p], DecodeConfig(max_new_tokens=8))[0] == plain
    # a missing map and a constant one are the same (uniform) saliency
    decode = DecodeConfig(max_new_tokens=8)
    img = _images()[1]
    constant = cap.prepare(img, np.zeros((14, 14)))
    assert cap.generate_ids([cap.prepare(img, None)], decode) == cap.generate_ids([constant], decode)
