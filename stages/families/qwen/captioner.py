"""Critique generation for the Qwen2.5-VL family: the Captioner of captioner.py with Qwen2.5-VL's inputs.

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

from stages.families.internvl.captioner import Captioner, DecodeConfig
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

    def prepare(self, img: Image.Image, saliency_map: np.ndarray | None) -> QwenPrompt:
        self.spec.image_tokens(img.width, img.height)  # an image the processor refuses: ImageError, a failed row
        features = self.processor(images=[img.convert("RGB")], return_tensors="pt")
        grid = features["image_grid_thw"]  # [1, 3]
        ids = prompt_ids(self.tokenizer, int(grid.prod()) // self.spec.merge_size**2)
        saliency = torch.as_tensor(saliency_map, dtype=torch.float32) if saliency_map is not None else None
        return QwenPrompt(ids, features["pixel_values"], grid, saliency)

    @torch.inference_mode()
    def generate_ids(self, prompts: list[QwenPrompt], decode: DecodeConfig = DecodeConfig()) -> list[list[int]]:
        """New token ids per prompt, up to and including eos (padding after it removed)."""
        n, length = len(prompts), max(len(p.input_ids) for p in prompts)
        input_ids = torch.full((n, length), self.tokenizer.pad_token_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((n, length), dtype=torch.long)  # [B, L]
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column L-1
            input_ids[i, length - len(p.input_ids):] = torch.as_tensor(p.input_ids)
            attention_mask[i, length - len(p.input_ids):] = 1
        image_token = self.model.config.image_token_id
        mm_token_type_ids = (input_ids == image_token).int() * attention_mask.int()  # [B, L]
        dtype = next(self.model.parameters()).dtype
        grid = torch.cat([p.image_grid_thw for p in prompts]).to(self.device)  # [B, 3]
        pixel_values = torch.cat([p.pixel_values for p in prompts]).to(self.device, dtype)  # [sum patches, 1176]
        maps = stack_maps([p.saliency_map for p in prompts]) if self.needs_saliency else None
        maps = (maps.to(self.device) if isinstance(maps, torch.Tensor) else [m.to(self.device) for m in maps]
                if maps is not None else None)
        image = self.model.get_image_features(pixel_values, grid, saliency_maps=maps, return_dict=True)
        if decode.do_sample:
            torch.manual_seed(decode.seed)
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            mm_token_type_ids=mm_token_type_ids.to(self.device),
            image_grid_thw=grid,
            mm_encoder_outputs={"image": image},
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **decode.generate_kwargs(),
        )  # [B, L + new]
        eos = self.tokenizer.eos_token_id
        return [row[: row.index(eos) + 1] if eos in row else row for row in out[:, length:].tolist()]
