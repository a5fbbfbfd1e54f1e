"""Qwen2.5-VL's captioner: the generation loop of stages/families/captioner.py with Qwen2.5-VL's inputs.

An image becomes the processor's patches + grid, its raw saliency map (None: uniform) and the chat
prompt with one ``<|image_pad|>`` per merged patch. A batch's image features (IAS tower -> merger) are
computed once and handed to ``generate`` as ``mm_encoder_outputs``, with ``image_grid_thw`` and
``mm_token_type_ids`` so generation places the 3-D rope as Qwen2.5-VL does (left padding included).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from stages.families.captioner import Captioner
from stages.families.qwen.data import ImageSpec, prompt_ids, stack_maps
from storage.images import ImageError


@dataclass
class QwenPrompt:
    """One image ready for the model."""

    input_ids: list[int]
    pixel_values: torch.Tensor  # [patches, 3*2*14*14]
    image_grid_thw: torch.Tensor  # [1, 3]
    saliency_map: torch.Tensor | None  # [h, w] raw; None: uniform


class QwenCaptioner(Captioner):
    """A loaded ASE-MLLM on Qwen2.5-VL + tokenizer + image processor: (image, saliency map) -> critique."""

    def __init__(self, model: Any, tokenizer: Any, spec: ImageSpec, device: torch.device | None = None) -> None:
        super().__init__(model, tokenizer, spec, device)
        self.processor = spec.processor()

    def image_cost(self, width: int, height: int) -> int:
        """Prompt-length key for batching: the image's LLM tokens (0 for an image prepare will refuse)."""
        try:
            return self.spec.image_tokens(width, height)
        except ImageError:
            return 0

    def prepare(self, img: Image.Image, saliency_map: np.ndarray | None, prompt: str | None = None) -> QwenPrompt:
        self.spec.image_tokens(img.width, img.height)  # an image the processor refuses: ImageError, a failed row
        features = self.processor(images=[img.convert("RGB")], return_tensors="pt")
        grid = features["image_grid_thw"]  # [1, 3]
        ids = prompt_ids(self.tokenizer, int(grid.prod()) // self.spec.merge_size**2, *([prompt] if prompt else []))
        saliency = torch.as_tensor(saliency_map, dtype=torch.float32) if saliency_map is not None else None
        return QwenPrompt(ids, features["pixel_values"], grid, saliency)

    def image_inputs(self, prompts: list[QwenPrompt], input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> dict[str, Any]:
        """Image features plus the grids and ``mm_token_type_ids``, so generation places the 3-D rope as
        Qwen2.5-VL does (left padding included)."""
        image_token = self.model.config.image_token_id
        mm_token_type_ids = (input_ids == image_token).int() * attention_mask.int()  # [B, L]
        dtype = next(self.model.parameters()).dtype
        grid = torch.cat([p.image_grid_thw for p in prompts]).to(self.device)  # [B, 3]
        pixel_values = torch.cat([p.pixel_values for p in prompts]).to(self.device, dtype)  # [sum patches, 1176]
        maps = stack_maps([p.saliency_map for p in prompts]) if self.needs_saliency else None
        maps = (maps.to(self.device) if isinstance(maps, torch.Tensor) else [m.to(self.device) for m in maps]
                if maps is not None else None)
        image = self.model.get_image_features(pixel_values, grid, saliency_maps=maps, return_dict=True)
        return {"mm_token_type_ids": mm_token_type_ids.to(self.device), "image_grid_thw": grid,
                "mm_encoder_outputs": {"image": image}}
