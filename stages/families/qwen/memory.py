"""What the memory plan needs to know of Qwen2.5-VL: its shapes under a setting, and what one vision block keeps."""
from __future__ import annotations

from typing import Any

from stages.families.shapes import Shapes, text_shapes

DEFAULT_PIXELS = 28 * 28 * 1280  # the Qwen2.5-VL image processor's default budget (1,280 LLM tokens)


def plan_shapes(config: Any, setting: Any) -> Shapes:
    """Shapes of the largest image the pixel budget (``setting.max_pixels``) lets through."""
    v = config.vision_config
    pixels = setting.max_pixels or DEFAULT_PIXELS
    side = v.patch_size * v.spatial_merge_size
    patches = pixels // side**2 * v.spatial_merge_size**2
    image_tokens = patches // v.spatial_merge_size**2
    window = min(patches, (v.window_size // v.patch_size) ** 2)  # patches per attention window
    full = len(v.fullatt_block_indexes)  # blocks with full attention; the others attend within a window
    text = text_shapes(config, setting)
    return Shapes(tiles=1, vision_tokens=patches, d=v.hidden_size, vision_mlp=v.intermediate_size,
                  vision_layers=v.depth, image_tokens=image_tokens, seq=image_tokens + setting.text_tokens,
                  pixel_bytes=patches * v.in_channels * v.temporal_patch_size * v.patch_size**2 * 4,
                  images=f"{pixels / 1e6:.2f} MP images",
                  attention_span=(full * patches + (v.depth - full) * window) / v.depth, vision_mlp_matrices=3,
                  projector_macs=16 * v.hidden_size**2 + 4 * v.hidden_size * text["h"],
                  projector_hidden=12 * v.hidden_size,  # the merger MLP is 4d -> 4d -> h wide
                  **text)


def vision_layer_bytes(s: Shapes, a: int, r: int, cast: bool, trainable_vit: bool, cross: bool) -> int:
    """Bytes autograd keeps per patch for one Qwen2.5-VL vision block (+ IAS) (residual stream fp32).

    RMSNorm keeps its input and the normalised input; the vision rope keeps fp32 q, k and their rotated
    halves; SwiGLU keeps the gate and up outputs and the SiLU output."""
    d = s.d
    n = 2 * r * d + 4 * r * d + 4 * a * d  # norm1; rope on q and k; SDPA q, k, v, out
    n += 2 * r * d + 3 * a * s.vision_mlp  # norm2; SwiGLU
    if trainable_vit:  # qkv, proj, gate / up (one input) and down inputs
        n += (a * d if cast else r * d) + a * d + (a * d if cast else r * d) + a * s.vision_mlp
    if cross:  # norm_query (normalised), norm_context, q / k,v inputs, rope, SDPA, o_proj input, gate product
        n += r * d + 2 * r * d + (a * d if cast else r * d) + (2 * a * d if cast else r * d) + 4 * r * d + 4 * a * d
        n += 2 * a * d
    return n
