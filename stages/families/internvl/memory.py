"""What the memory plan needs to know of InternVL: its shapes under a setting, and what one IAS-ViT layer keeps."""
from __future__ import annotations

from typing import Any

from stages.families.shapes import Shapes, text_shapes


def plan_shapes(config: Any, setting: Any) -> Shapes:
    """Shapes of the largest sample: ``setting.max_tiles`` tiles of 448 px plus the thumbnail."""
    from stages.families.internvl.model import tokens_per_tile

    v = config.vision_config
    tiles = setting.max_tiles + (1 if setting.max_tiles > 1 else 0)
    grid = v.image_size[0] // v.patch_size[0]
    image_tokens = tiles * tokens_per_tile(config)
    text = text_shapes(config, setting)
    a = 2 if setting.compute in ("bf16", "fp16") else 4
    # per pixel: the batch's uint8 tiles, their normalised copy in the compute dtype and the fp32 saliency tile
    pixel = 3 + 3 * a + 4
    return Shapes(tiles=tiles, vision_tokens=grid * grid + 1, d=v.hidden_size, vision_mlp=v.intermediate_size,
                  vision_layers=v.num_hidden_layers, image_tokens=image_tokens,
                  seq=image_tokens + setting.text_tokens, pixel_bytes=tiles * pixel * v.image_size[0] ** 2,
                  images=f"{setting.max_tiles} tiles", attention_span=grid * grid + 1, vision_mlp_matrices=2,
                  projector_macs=4 * v.hidden_size * text["h"] + text["h"] ** 2, projector_hidden=2 * text["h"],
                  **text)


def vision_layer_bytes(s: Shapes, a: int, r: int, cast: bool, trainable_vit: bool, cross: bool) -> int:
    """Bytes autograd keeps per vision token for one IAS-ViT layer (residual stream of ``r`` bytes; ``cast``:
    autocast keeps a compute-dtype copy of each fp32 Linear input)."""
    d = s.d
    n = r * d + 4 * a * d  # layernorm_before input; SDPA q, k, v, out
    n += r * d + a * s.vision_mlp  # layernorm_after input; GELU input
    if trainable_vit:  # the layer's own Linears and layer-scale products keep their inputs
        n += (3 * a * d if cast else r * d) + a * d + (a * d if cast else r * d) + a * s.vision_mlp + 2 * a * d
    if cross:  # norm_context input, q/k/v inputs, SDPA, o_proj input, gate product
        n += r * d + (a * d if cast else r * d) + (2 * a * d if cast else r * d) + 4 * a * d + a * d + a * d
    return n
