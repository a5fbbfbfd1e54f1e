"""ASE-MLLM assembly against transformers' own InternVL (same weights) and torch's cross-entropy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, InternVLConfig, InternVLForConditionalGeneration

from stages.families.internvl.collate import saliency_inputs
from stages.families.fusion import cross_attention_parameters
from stages.families.internvl.model import (
    IASInternVLConfig,
    IASInternVLForConditionalGeneration,
    build_tiny_model,
    load_base,
    tiny_internvl_config,
    tokens_per_tile,
)

VOCAB = 300


def _model(fusion: str = "cross_attention", seed: int = 0) -> IASInternVLForConditionalGeneration:
    torch.manual_seed(seed)
    return build_tiny_model("tiny", vocab_size=VOCAB, fusion=fusion).eval()


def _base_config(config: IASInternVLConfig) -> InternVLConfig:
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version", "ias_fusion")}
    return InternVLConfig(**fields)


def _base_with_same_weights(model: IASInternVLForConditionalGeneration) -> InternVLForConditionalGeneration:
    base = InternVLForConditionalGeneration(_base_config(model.config)).eval()
    result = base.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    assert set(result.unexpected_keys) == {n for n, _ in cross_attention_parameters(model)}
    return base


def _open_gates(model: IASInternVLForConditionalGeneration, scale: float = 1.0) -> None:
    """A "trained" fusion: non-zero gates and cross-attention weights large enough to attend selectively."""
    g = torch.Generator().manual_seed(7)
    for name, p in cross_attention_parameters(model):
        if name.endswith(".gate"):
            p.data = scale * torch.randn(p.shape, generator=g)
        elif name.endswith("proj.weight"):
            p.data = 0.3 * torch.randn(p.shape, generator=g)


GRIDS = {1: (1, 1, 0), 2: (2, 1, 0), 3: (2, 1, 1)}  # tile count -> (cols, rows, thumbnail)
SALIENCY_KEYS = ("saliency_maps", "saliency_map_sizes", "tile_grids")


def _without_saliency(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in SALIENCY_KEYS}


def _other_maps(batch: dict, seed: int = 5) -> dict:
    """The same batch with different saliency maps."""
    maps = torch.rand(batch["saliency_maps"].shape, generator=torch.Generator().manual_seed(seed))
    return {**batch, "saliency_maps": maps}


def _batch(model: IASInternVLForConditionalGeneration, tiles: tuple[int, ...] = (1, 3), seed: int = 0) -> dict:
    """Right-padded batch: [bos, prompt, <image> x tokens_per_tile x T_i, text...]; tiles in sample order; each
    image's raw saliency map (14 x 14 and 56 x 56: sizes differ in a batch) with its tile grid."""
    g = torch.Generator().manual_seed(seed)
    n = tokens_per_tile(model.config)
    img = model.config.image_token_id
    rows = [
        torch.cat([torch.randint(1, 200, (3,), generator=g), torch.full((n * t,), img),
                   torch.randint(1, 200, (4 + i,), generator=g)])
        for i, t in enumerate(tiles)
    ]
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
    s = model.config.vision_config.image_size[0]
    total = sum(tiles)
    maps = [torch.rand(14 if i % 2 == 0 else 56, 14 if i % 2 == 0 else 56, generator=g) for i in range(len(tiles))]
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.randn(total, 3, s, s, generator=g),
                **saliency_inputs(maps, [GRIDS[t] for t in tiles]))


@pytest.mark.parametrize("fusion", ["none", "cross_attention"])
def test_image_features_equal_internvl_get_image_features(fusion: str) -> None:
    """Pixel shuffle + projector oracle: fusion off (or gates at zero) gives transformers' features exactly."""
    model = _model(fusion)
    base = _base_with_same_weights(model)
    batch = _batch(model)
    with torch.no_grad():
        ours = model.model.get_image_features(batch["pixel_values"], **{k: batch[k] for k in SALIENCY_KEYS})
        ref = base.model.get_image_features(batch["pixel_values"])
    assert ours.pooler_output.shape == (4, tokens_per_tile(model.config), model.config.text_config.hidden_size)
    assert torch.equal(ours.pooler_output, ref.pooler_output)


def test_logits_equal_base_internvl_when_gates_are_zero() -> None:
    model = _model()
    base = _base_with_same_weights(model)
    batch = _batch(model)
    with torch.no_grad():
        ours = model(**batch).logits
        ref = base(**_without_saliency(batch)).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_open_gates_saliency_changes_logits_and_samples_stay_independent() -> None:
    model = _model()
    _open_gates(model)
    batch = _batch(model)
    with torch.no_grad():
        logits = model(**batch).logits
        other = model(**_other_maps(batch)).logits
        # sample 1 alone: its 3 tiles are pixel_values[1:4], its 56 x 56 map unpadded
        alone = model(input_ids=batch["input_ids"][1:], attention_mask=batch["attention_mask"][1:],
                      pixel_values=batch["pixel_values"][1:],
                      **saliency_inputs([batch["saliency_maps"][1]], [GRIDS[3]])).logits
    assert not torch.allclose(logits, other, atol=1e-3)
    torch.testing.assert_close(logits[1:], alone, rtol=1e-4, atol=1e-4)


def test_loss_is_cross_entropy_on_critique_tokens_only() -> None:
    model = _model()
    _open_gates(model)
    batch = _batch(model)
    labels = torch.full_like(batch["input_ids"], -100)
    lengths = batch["attention_mask"].sum(1)
    for i, n in enumerate(lengths.tolist()):
        labels[i, n - 3 : n] = batch["input_ids"][i, n - 3 : n]  # the last 3 tokens are the "critique"
    full = model(**batch).logits  # [B, L, V]: no labels, every position
    shifted_logits, shifted_labels = full[:, :-1], labels[:, 1:]
    ref = F.cross_entropy(shifted_logits.reshape(-1, VOCAB).float(), shifted_labels.reshape(-1), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters()], allow_unused=True)
    # with labels the model projects only the labelled positions onto the vocab: same loss, same gradients
    out = model(**batch, labels=labels)
    keep = shifted_labels != -100
    assert out.logits.shape == (int(keep.sum()), VOCAB)
    torch.testing.assert_close(out.logits, shifted_logits[keep])
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    for (name, p), g in zip(model.named_parameters(), ref_grads):
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)
    gates = [p for n, p in cross_attention_parameters(model) if n.endswith(".gate")]
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)


def test_generate_uses_saliency_and_equals_a_greedy_forward_loop() -> None:
    model = _model()
    _open_gates(model, scale=3.0)
    batch = _batch(model, tiles=(2,))
    batch.pop("attention_mask")
    steps = 4
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
        ids = batch["input_ids"]
        for _ in range(steps):  # oracle: full forward without cache, argmax of the last position
            logits = model(**{**batch, "input_ids": ids}).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        other = model(**{**batch, "saliency_maps": -batch["saliency_maps"]}).logits[:, -1]
    assert torch.equal(generated, ids)
    assert not torch.allclose(other, model(**batch).logits[:, -1], atol=1e-3)


def test_image_token_count_must_match_tiles() -> None:
    """Fewer tiles than image tokens fail in the scatter of the features (the model does not count the tokens on
    the device: that would read a value back on every forward)."""
    model = _model()
    batch = _batch(model, tiles=(1, 3))
    with pytest.raises(RuntimeError, match="Number of elements of source < number of ones in mask"):
        model(**{**_without_saliency(batch), "pixel_values": batch["pixel_values"][:3],
                 **saliency_inputs([batch["saliency_maps"][0], batch["saliency_maps"][1]], [GRIDS[1], GRIDS[2]])})


def test_saliency_inputs_must_describe_the_tiles() -> None:
    model = _model()
    batch = _batch(model, tiles=(1, 3))
    with pytest.raises(ValueError, match="tile_grids describe 4 tiles but pixel_values holds 3"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:3]})
    with pytest.raises(ValueError, match="saliency_maps, saliency_map_sizes and tile_grids"):
        model(**_without_saliency(batch))
    with torch.no_grad():  # the ablation needs none of them
        _model("none")(**_without_saliency(batch))


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    model = _model()
    _open_gates(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["ias_fusion"] == "cross_attention" and saved["model_type"] == "ias_internvl"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, IASInternVLForConditionalGeneration)
    batch = _batch(model)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    ablation = _model("none")
    ablation.save_pretrained(tmp_path / "none")
    assert IASInternVLForConditionalGeneration.from_pretrained(tmp_path / "none").config.ias_fusion == "none"


def test_load_base_reports_only_cross_attention_keys_missing(tmp_path: Path) -> None:
    torch.manual_seed(3)
    base = InternVLForConditionalGeneration(_base_config(tiny_internvl_config("tiny", vocab_size=VOCAB))).eval()
    base.save_pretrained(tmp_path)
    model, missing = load_base(tmp_path)
    assert missing == sorted(n for n, _ in cross_attention_parameters(model))
    assert len(missing) == base.config.vision_config.num_hidden_layers * 10
    model.eval()
    batch = _batch(model)
    with torch.no_grad():
        ref = base(**_without_saliency(batch)).logits
        assert torch.equal(model(**batch).logits, ref)  # zero gates: starts as the base model

    ablation, missing = load_base(tmp_path, fusion="none")
    assert missing == [] and not cross_attention_parameters(ablation)


def test_default_trainable_parts_freeze_only_the_vision_base() -> None:
    from stages.finetune.train import PARTS, set_trainable

    model = _model()
    n = sum(set_trainable(model, ("cross_attention", "projector", "llm")).values())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert {name for name, _ in cross_attention_parameters(model)} <= trainable
    assert any(name.startswith("model.multi_modal_projector.") for name in trainable)
    assert any(name.startswith("model.language_model.") for name in trainable)
    assert not any(name.startswith("model.vision_tower.") and ".cross_attention." not in name for name in trainable)
    set_trainable(model, PARTS)
    assert all(p.requires_grad for p in model.parameters())


def test_registered_configs() -> None:
    real = tiny_internvl_config("internvit300m-shape")
    v = real.vision_config
    assert (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.intermediate_size) == (24, 1024, 16, 4096)
    assert tokens_per_tile(real) == 256 == real.image_seq_length  # 448 px / 14 = 32x32 -> pixel shuffle -> 16x16
    tiny = tiny_internvl_config("tiny", vocab_size=VOCAB)
    assert tiny.image_token_id == VOCAB - 1 and tokens_per_tile(tiny) == tiny.image_seq_length == 64
    with pytest.raises(ValueError):
        tiny_internvl_config("tiny", vocab_size=VOCAB, image_token_id=VOCAB)
    with pytest.raises(KeyError):
        tiny_internvl_config("huge")
    with pytest.raises(ValueError):
        tiny_internvl_config("tiny", fusion="sum")
