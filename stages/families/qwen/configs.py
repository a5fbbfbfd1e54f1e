"""Qwen2.5-VL's registered shapes, as plain values (no model library needed to list them): tiny ones to build
with random weights (``--tiny-model``) and real ones for memory plans (``ase-mllm plan --base``)."""
from __future__ import annotations

from typing import Any


# Qwen2.5-VL's vision tower as released (3B / 7B / 72B share it): 32 blocks x 1280, 16 heads, SwiGLU 3420,
# windows of 112 px, full attention in blocks 7, 15, 23, 31
VISION_QWEN25VL = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
# the tiny towers: windows of 56 px (2 x 2 merged tokens), a window block then a full-attention block
VISION_TINY = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, window_size=56,
                   fullatt_block_indexes=[1])


def _text(hidden: int, layers: int, heads: int, kv: int, mlp: int, **kw: Any) -> dict[str, Any]:
    head_dim = hidden // heads  # m-rope sections (t, h, w) split the rotary half of a head: 1/4, 3/8, 3/8
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=mlp, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": section}, **kw)


# name -> (vision kwargs, text kwargs, image processor pixel budget); vocab and special token ids come from the
# tokenizer. Tiny models in the spirit of timm's registry; the demo's Qwen model is "demo-qwen".
TINY_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, int]]] = {
    "tiny-qwen": (VISION_TINY, _text(64, 2, 4, 2, 128), dict(min_pixels=56 * 56, max_pixels=4 * 224 * 224)),
    "demo-qwen": (VISION_TINY, _text(128, 3, 4, 2, 384), dict(min_pixels=56 * 56, max_pixels=4 * 224 * 224)),
    # the real Qwen2.5-VL tower, a tiny LLM
    "qwen2.5-vl-vision-shape": (VISION_QWEN25VL, _text(64, 2, 4, 2, 128), dict(min_pixels=56 * 56,
                                                                              max_pixels=28 * 28 * 1280)),
}
# real shapes for `ase-mllm plan` (config.json values of the Qwen2.5-VL-3B / 7B-Instruct releases)
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b": dict(vision={**VISION_QWEN25VL, "out_hidden_size": 3584}, text=dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        tie_word_embeddings=False),
    "qwen2.5-vl-3b": dict(vision={**VISION_QWEN25VL, "out_hidden_size": 2048}, text=dict(
        hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
        intermediate_size=11008, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        tie_word_embeddings=True),
}
# the special tokens' ids in the Qwen2.5-VL vocabulary
SPECIAL_IDS = dict(vision_start_token_id=151652, vision_end_token_id=151653, image_token_id=151655,
                   video_token_id=151656)
