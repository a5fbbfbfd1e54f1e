"""The shapes the memory plan and the FLOP count read: one record whatever the family.

Each family fills it from its config (``Family.plan_shapes``) and says what its vision layer keeps for
backward (``Family.vision_layer_bytes``); ``stages/finetune/plan.py`` counts the rest the same way for all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shapes:
    tiles: int  # vision tower inputs per sample (InternVL: tiles + thumbnail; Qwen2.5-VL: one image)
    vision_tokens: int  # per tower input (patches, + CLS for InternViT)
    d: int
    vision_mlp: int
    vision_layers: int
    image_tokens: int  # LLM tokens per sample from the image
    seq: int  # LLM tokens per sample
    labelled: int  # positions with a loss per sample
    h: int
    kv: int  # key/value width
    mlp: int
    layers: int
    vocab: int
    pixel_bytes: int  # model inputs per sample on the device (InternVL: uint8 tiles, normalised copy, saliency tile)
    images: str  # the image side of the setting, for people: "12 tiles", "1.00 MP images"
    attention_span: float  # keys per vision query, averaged over the layers (window attention sees fewer)
    vision_mlp_matrices: int  # 2 (GELU MLP) or 3 (SwiGLU: gate, up, down)
    projector_macs: int  # multiply-adds of the projector per image token
    projector_hidden: int  # elements the projector keeps per image token in the compute dtype, past its input


def text_shapes(config: Any, setting: Any) -> dict[str, int]:
    """The LLM side of :class:`Shapes` (every family's LLM is a Qwen2-style decoder)."""
    t = config.text_config
    labelled = setting.labelled_tokens if setting.labelled_tokens is not None else max(1, setting.text_tokens - 32)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return dict(labelled=labelled, h=t.hidden_size, kv=t.num_key_value_heads * head_dim, mlp=t.intermediate_size,
                layers=t.num_hidden_layers, vocab=t.vocab_size)
