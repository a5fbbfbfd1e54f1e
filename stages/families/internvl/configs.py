"""InternVL's registered shapes, as plain values (no model library needed to list them): tiny ones to build
with random weights (``--tiny-model``) and real ones for memory plans (``ase-mllm plan --base``)."""
from __future__ import annotations

from typing import Any


def _qwen2_tiny(vocab_size: int) -> dict[str, Any]:
    return dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                tie_word_embeddings=True)


def _qwen2_demo(vocab_size: int) -> dict[str, Any]:
    return {**_qwen2_tiny(vocab_size), "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3}


# name -> (vision config kwargs, text config kwargs given the vocab size); tiny models in the spirit of timm's registry
TINY_CONFIGS: dict[str, tuple[dict[str, Any], Any]] = {
    # 2 layers x 64, 224 px tiles of 16x16 patches -> 64 LLM tokens per tile
    "tiny": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  image_size=224, patch_size=14), _qwen2_tiny),
    # the demo's model (`make demo`): a 4 x 128 vision tower that reads every subject's colour and focus from its own
    # tokens (a 2 x 64 one, trained the same way on 6,000 renders, read held-out colours at 0.85, this one at 0.96),
    # a 3 x 128 LLM that can learn the critiques' language
    "demo": (dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=8, intermediate_size=256,
                  image_size=224, patch_size=14), _qwen2_demo),
    # InternViT-300M's shape (24 x 1024, 16 heads, MLP 4096, qkv bias, 448 px, patch 14), tiny LLM
    "internvit300m-shape": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                 intermediate_size=4096, attention_bias=True, image_size=448, patch_size=14),
                            _qwen2_tiny),
}


def _internvit_300m() -> dict[str, Any]:
    """InternViT-300M-448px (InternVL2-8B / InternVL3-8B vision tower): 24 x 1024, 16 heads, MLP 4096."""
    return dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                attention_bias=True, image_size=448, patch_size=14, use_qk_norm=False, norm_type="layer_norm",
                layer_scale_init_value=0.1, use_mean_pooling=True)


NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # the paper's base: InternViT-300M + InternLM2-7B/8B-chat (InternLM2 runs as Llama: convert-base)
    "internvl2-8b": dict(vision=_internvit_300m(), text=dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=92553, max_position_embeddings=32768, tie_word_embeddings=False)),
    # InternVL3-8B-hf: InternViT-300M-448px-V2_5 + Qwen2.5-7B
    "internvl3-8b": dict(vision=_internvit_300m(), text=dict(
        model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=151674, max_position_embeddings=32768, tie_word_embeddings=False)),
    # the GPU script's model: InternViT-300M + a Qwen2-0.5B-shaped LLM (InternVL2.5-1B / InternVL3-1B class)
    "internvit300m-qwen2-0.5b": dict(vision=_internvit_300m(), text=dict(
        model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151674, max_position_embeddings=32768, tie_word_embeddings=True)),
}
