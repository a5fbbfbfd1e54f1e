"""InternVL's captioner: an image becomes its tiles, its raw saliency map + tile grid and a prompt with one
``<IMG_CONTEXT>`` run per tile; a batch's image features are IAS-ViT -> pixel shuffle -> projector (the
generation loop: stages/families/captioner.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from stages.families.captioner import Captioner
from stages.families.internvl.collate import saliency_inputs
from stages.families.internvl.prompting import prompt_ids
from stages.families.internvl.tiling import plan_tiles, tile_image


@dataclass
class Prompt:
    """One image ready for the model."""

    input_ids: list[int]
    pixel_values: torch.Tensor  # [T, 3, S, S] uint8 (normalised by the model on its device)
    saliency_map: np.ndarray | None  # raw map [h, w]; None: uniform (no map, or a model without saliency fusion)
    tile_grid: tuple[int, int, int]  # (cols, rows, thumbnail) of pixel_values


class InternVLCaptioner(Captioner):
    """``spec``: the run's TileSpec."""

    def image_cost(self, width: int, height: int) -> int:
        """Prompt-length key for batching: the image's tile count."""
        t = self.spec
        return plan_tiles(width, height, t.tile_size, t.min_tiles, t.max_tiles, t.use_thumbnail).num_tiles

    def prepare(self, img: Image.Image, saliency_map: np.ndarray | None, prompt: str | None = None) -> Prompt:
        """Tiles, raw saliency map (None or constant: uniform) + tile grid and prompt ids of one image (the aesthetic
        question, or ``prompt``); the model cuts the map into saliency tiles on its device, as in training."""
        t = self.spec
        tiling = plan_tiles(img.width, img.height, t.tile_size, t.min_tiles, t.max_tiles, t.use_thumbnail)
        pixel_values = tile_image(img, tiling, t.tile_size)  # [T, 3, S, S]
        ids = prompt_ids(self.tokenizer, t.tokens_per_tile * tiling.num_tiles, *([prompt] if prompt else []))
        return Prompt(ids, pixel_values, saliency_map if self.needs_saliency else None, tiling.tile_grid)

    def image_inputs(self, prompts: list[Prompt], input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> dict[str, Any]:
        pixel_values = torch.cat([p.pixel_values for p in prompts]).to(self.device)  # [sum T, 3, S, S] uint8
        saliency = ({k: v.to(self.device) if torch.is_tensor(v) else v for k, v in  # maps [B, h, w]; host lists
                     saliency_inputs([p.saliency_map for p in prompts], [p.tile_grid for p in prompts]).items()}
                    if self.needs_saliency else {})
        image = self.model.get_image_features(pixel_values, **saliency, return_dict=True)
        return {"mm_encoder_outputs": {"image": image}}
