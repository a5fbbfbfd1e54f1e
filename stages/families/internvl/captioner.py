"""A loaded run as a captioner: (image, saliency map) -> critique, batched, left-padded, KV-cached.

Image features (vision tower -> projector) are computed once per batch and handed to ``generate`` as
``mm_encoder_outputs``, which transformers expands correctly for beam search (tiles of one image stay
together). :class:`Captioner` is the InternVL family's; ``qwen/captioner.py`` adapts it to Qwen2.5-VL.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class DecodeConfig:
    """How critiques are decoded: greedy by default, beam search or nucleus sampling on request."""

    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # sampling only: reseeded per batch
    no_repeat_ngram_size: int = 0  # > 0: an n-gram of this size never repeats within a critique

    def tag(self) -> str:
        """'' for the default (greedy), else a short stable name for the predictions directory."""
        if self == DecodeConfig():
            return ""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def generate_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.do_sample)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        if self.no_repeat_ngram_size:
            kw.update(no_repeat_ngram_size=self.no_repeat_ngram_size)
        return kw


@dataclass
class Prompt:
    """One image ready for the model."""

    input_ids: list[int]
    pixel_values: torch.Tensor  # [T, 3, S, S]
    saliency_map: np.ndarray | None  # raw map [h, w]; None: uniform (no map, or a model without saliency fusion)
    tile_grid: tuple[int, int, int]  # (cols, rows, thumbnail) of pixel_values


class Captioner:
    """A loaded ASE-MLLM + tokenizer + its image spec (InternVL: a TileSpec): (image, saliency map) -> critique,
    in batches."""

    def __init__(self, model: Any, tokenizer: Any, spec: Any, device: torch.device | None = None) -> None:
        self.device = device or default_device()
        dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.model = model.to(self.device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer, self.spec = tokenizer, spec
        self.needs_saliency = getattr(model.config, "ias_fusion", "none") == "cross_attention"

    def image_cost(self, width: int, height: int) -> int:
        """Prompt-length key for batching: the image's tile count."""
        from stages.families.internvl.tiling import plan_tiles

        t = self.spec
        return plan_tiles(width, height, t.tile_size, t.min_tiles, t.max_tiles, t.use_thumbnail).num_tiles

    def prepare(self, img: Image.Image, saliency_map: np.ndarray | None) -> Prompt:
        """Tiles, raw saliency map (None or constant: uniform) + tile grid and prompt ids of one image; the model
        cuts the map into saliency tiles on its device, as in training."""
        from stages.families.internvl.prompting import prompt_ids
        from stages.families.internvl.tiling import plan_tiles, tile_image

        t = self.spec
        tiling = plan_tiles(img.width, img.height, t.tile_size, t.min_tiles, t.max_tiles, t.use_thumbnail)
        pixel_values = tile_image(img, tiling, t.tile_size)  # [T, 3, S, S]
        ids = prompt_ids(self.tokenizer, t.tokens_per_tile * tiling.num_tiles)
        return Prompt(ids, pixel_values, saliency_map if self.needs_saliency else None, tiling.tile_grid)

    def generate(self, prompts: list[Prompt], decode: DecodeConfig = DecodeConfig()) -> list[str]:
        """Critiques of a batch of prompts (left-padded, one ``generate`` call)."""
        texts = self.tokenizer.batch_decode(self.generate_ids(prompts, decode), skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    @torch.inference_mode()
    def generate_ids(self, prompts: list[Prompt], decode: DecodeConfig = DecodeConfig()) -> list[list[int]]:
        """New token ids per prompt, up to and including eos (padding after it removed)."""
        n, length = len(prompts), max(len(p.input_ids) for p in prompts)
        input_ids = torch.full((n, length), self.tokenizer.pad_token_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((n, length), dtype=torch.long)  # [B, L]
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column L-1
            input_ids[i, length - len(p.input_ids):] = torch.as_tensor(p.input_ids)
            attention_mask[i, length - len(p.input_ids):] = 1
        from stages.families.internvl.collate import saliency_inputs

        dtype = next(self.model.parameters()).dtype
        pixel_values = torch.cat([p.pixel_values for p in prompts]).to(self.device, dtype)  # [sum T, 3, S, S]
        saliency = ({k: v.to(self.device) for k, v in  # maps [B, h, w] float32, sizes [B, 2], grids [B, 3]
                     saliency_inputs([p.saliency_map for p in prompts], [p.tile_grid for p in prompts]).items()}
                    if self.needs_saliency else {})
        image = self.model.get_image_features(pixel_values, **saliency, return_dict=True)
        if decode.do_sample:
            torch.manual_seed(decode.seed)
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            mm_encoder_outputs={"image": image},
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **decode.generate_kwargs(),
        )  # [B, L + new]
        eos = self.tokenizer.eos_token_id
        ids = []
        for row in out[:, length:].tolist():
            ids.append(row[: row.index(eos) + 1] if eos in row else row)
        return ids


def default_device() -> torch.device:
    """cuda:<LOCAL_RANK> when a GPU is present (one per torchrun rank), else CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}")
    return torch.device("cpu")
