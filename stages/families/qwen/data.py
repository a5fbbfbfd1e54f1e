"""The Qwen2.5-VL family's data path: image processor, tokenizer and chat prompt, dataset, collator.

Images go through transformers' own Qwen2.5-VL image processor (``Qwen2VLImageProcessorPil``: smart
resize to multiples of 28 within a pixel budget, CLIP normalisation, 14 x 14 patches in 2 x 2 merge
order), giving ``pixel_values`` [patches, 3*2*14*14] and ``image_grid_thw`` [1, 3] per image. The prompt
follows Qwen2.5-VL's chat convention: the user turn is ``<|vision_start|>`` + ``<|image_pad|>`` x
(patches / 4) + ``<|vision_end|>`` + the paper's prompt, after the default system turn; labels as
for InternVL (the critique and the end-of-turn eos). Each example ships its image's raw saliency map
(or None: no map, the uniform rule of tiling.uniform_saliency); the model expands it to patches on the
device (qwen/vit.py patch_saliency).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from stages.families.data import CritiqueData, pad_tokens, sample_ids
from stages.families.text import IM_END, IM_START, PAD, PROMPT, Encoded, bpe_tokenizer, encode_after, token_ids
from storage.images import ImageError, open_rgb, safe_join

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
IMAGE_TOKENS = (VISION_START, IMAGE_PAD, VISION_END)
SPECIAL_TOKENS = [PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
SYSTEM = "You are a helpful assistant."

# Qwen2.5-VL's chat convention (ChatML, a default system turn, an image as vision_start / image_pad / vision_end)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ---------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageSpec:
    """The image processor's settings (recorded in run_config.json as ``image``)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = field(default=tuple(OPENAI_CLIP_MEAN))
    image_std: tuple[float, ...] = field(default=tuple(OPENAI_CLIP_STD))

    @staticmethod
    def of(base: str | Path | None, budget: dict[str, int], max_pixels: int | None = None) -> ImageSpec:
        """A base's ``preprocessor_config.json`` settings (else the defaults) with ``budget`` / ``max_pixels``."""
        cfg: dict[str, Any] = {}
        if base is not None and (Path(base) / "preprocessor_config.json").exists():
            cfg = json.loads((Path(base) / "preprocessor_config.json").read_text())
        spec = {k: tuple(cfg[k]) if isinstance(cfg.get(k), list) else cfg[k]
                for k in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std") if k in cfg}
        spec.update(budget)
        if max_pixels is not None:
            spec["max_pixels"] = max_pixels
        return ImageSpec(**spec)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ImageSpec:
        return ImageSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def processor(self) -> Qwen2VLImageProcessorPil:
        return Qwen2VLImageProcessorPil(
            size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}, patch_size=self.patch_size,
            merge_size=self.merge_size, temporal_patch_size=self.temporal_patch_size,
            image_mean=list(self.image_mean), image_std=list(self.image_std))

    def image_tokens(self, width: int, height: int) -> int:
        """LLM tokens of a ``width x height`` image (the processor's smart resize, then 2x2 merge); an image the
        processor refuses (aspect ratio above 200) is an ImageError (a failed row in generation)."""
        factor = self.patch_size * self.merge_size
        if max(width, height) > 200 * min(width, height):
            raise ImageError("aspect_ratio", f"{width}x{height}: the Qwen2.5-VL image processor takes aspect "
                                             "ratios up to 200")
        h, w = smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return (h // factor) * (w // factor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- tokenizer and prompt


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerBase:
    """The demo's byte-level BPE with Qwen2.5-VL's special tokens and chat convention."""
    return bpe_tokenizer(texts, SPECIAL_TOKENS, CHAT_TEMPLATE, vocab_size)


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """A Qwen2.5-VL tokenizer (a base's, or one saved by ``Family.dataset_tokenizer``); its chat template from
    the tokenizer config or, as Qwen2.5-VL releases ship it, ``chat_template.json`` / ``.jinja``."""
    tok = AutoTokenizer.from_pretrained(str(directory))
    missing = [t for t in IMAGE_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        raise ValueError(f"{directory}: tokenizer lacks Qwen2.5-VL image tokens {missing}")
    if tok.chat_template is None:
        for name in ("chat_template.jinja", "chat_template.json"):
            path = Path(directory) / name
            if path.exists():
                text = path.read_text()
                tok.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        else:
            raise ValueError(f"{directory}: no chat template (tokenizer config, chat_template.json or .jinja)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The model config's special token ids, from the tokenizer."""
    ids = tokenizer.convert_tokens_to_ids([IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END])
    return dict(zip(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"), ids))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, n_image_tokens: int, prompt: str = PROMPT) -> list[int]:
    """Token ids of the generation-time prompt, ``<|image_pad|>`` repeated once per image token."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = text.split(IMAGE_PAD, 1)
    pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    return token_ids(tokenizer, before) + [pad] * n_image_tokens + token_ids(tokenizer, after)


def encode_example(tokenizer: PreTrainedTokenizerBase, n_image_tokens: int, critique: str,
                   max_length: int | None = None) -> Encoded:
    """Prompt + critique + eos; loss only on the critique and eos (``max_length`` truncates the critique)."""
    return encode_after(tokenizer, prompt_ids(tokenizer, n_image_tokens), critique, max_length)


# ---------------------------------------------------------------- dataset and collator


class QwenCritiqueDataset(CritiqueData):
    """``(image, comment)`` pairs of one split -> patches, grid, raw saliency map and tokens (``spec``: an
    :class:`ImageSpec`): native-resolution images instead of tiles."""

    image_limit_option = "--max-pixels"

    def __init__(self, dataset: str, split: str, tokenizer: PreTrainedTokenizerBase, spec: ImageSpec, store: Any | None,
                 allow_missing_saliency: bool = False, max_length: int | None = None, limit: int | None = None) -> None:
        self.processor = spec.processor()
        super().__init__(dataset, split, tokenizer, spec, store, allow_missing_saliency, max_length, limit)
        self.max_pixels = spec.max_pixels  # the memory plan's image size

    def prompt_ids(self, n_image_tokens: int) -> list[int]:
        return prompt_ids(self.tokenizer, n_image_tokens)

    def image_tokens(self, width: int, height: int) -> int:
        return self.spec.image_tokens(width, height)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, sha, text = self.items[index]
        img = open_rgb(safe_join(self.root, path))
        features = self.processor(images=[img], return_tensors="pt")
        grid = features["image_grid_thw"]  # [1, 3]
        enc = encode_example(self.tokenizer, int(grid.prod()) // self.spec.merge_size**2, text, self.max_length)
        return {
            "sample_id": index,
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "pixel_values": features["pixel_values"],  # [patches, 3*2*14*14]
            "image_grid_thw": grid,
            "saliency_map": self.saliency_map(sha),  # [h, w] raw, or None: uniform
        }


def stack_maps(maps: list[torch.Tensor | None]) -> torch.Tensor | list[torch.Tensor]:
    """One raw map per image as [N, h, w]; an image without one gets a constant map (= uniform). Maps of
    different shapes (never from one saliency source) stay a list."""
    shapes = {tuple(m.shape) for m in maps if m is not None}
    shape = next(iter(shapes)) if len(shapes) == 1 else (1, 1)
    full = [m if m is not None else torch.ones(shape) for m in maps]
    return torch.stack(full) if len(shapes) <= 1 else full


@dataclass
class QwenCollator:
    """Right-padded tokens, ``mm_token_type_ids`` (1 at image tokens: the 3-D rope's image positions),
    patches and grids concatenated in batch order, one raw map per image."""

    pad_token_id: int
    image_token_id: int
    keep_sample_ids: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = pad_tokens(examples, self.pad_token_id)  # input_ids, attention_mask, labels [B, L]
        batch = {
            **tokens,
            "mm_token_type_ids": (tokens["input_ids"] == self.image_token_id).int() * tokens["attention_mask"].int(),
            "pixel_values": torch.cat([e["pixel_values"] for e in examples]),  # [sum patches, 1176]
            "image_grid_thw": torch.cat([e["image_grid_thw"] for e in examples]),  # [N, 3]
            "saliency_maps": stack_maps([e["saliency_map"] for e in examples]),  # [N, h, w]
        }
        if self.keep_sample_ids:
            batch["sample_ids"] = sample_ids(examples)  # [B]
        return batch
