"""The Qwen2.5-VL family as the pipeline sees it: its names, configs, model, tokenizer, data and captioner."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.families.family import Family


class Qwen25VL(Family):
    name = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    paper_table = "III"  # the paper's second base, Qwen-VL-Chat: a different (older, remote-code) model
    untrained_run = "untrained-qwen2.5-vl"
    spec_key = "image"
    model_types = ("qwen2_5_vl", "ias_qwen2_5_vl")
    lora_modules = {"vision": "visual", "projector": "merger"}

    def tiny_names(self) -> list[str]:
        from stages.families.qwen.configs import TINY_CONFIGS

        return list(TINY_CONFIGS)

    def named_names(self) -> list[str]:
        from stages.families.qwen.configs import NAMED_CONFIGS

        return list(NAMED_CONFIGS)

    def tiny_config(self, name: str, vocab_size: int, fusion: str) -> Any:
        from stages.families.qwen.model import tiny_config

        return tiny_config(name, vocab_size=vocab_size, fusion=fusion)

    def named_config(self, name: str, fusion: str) -> Any:
        from stages.families.qwen.model import named_config

        return named_config(name, fusion)

    def ias_config(self, config: Any, fusion: str) -> Any:
        from stages.families.qwen.model import ias_config

        return ias_config(config, fusion)

    def model_class(self) -> type:
        from stages.families.qwen.model import IASQwen2_5_VLForConditionalGeneration

        return IASQwen2_5_VLForConditionalGeneration

    def build_tiny(self, name: str, tokenizer: Any, fusion: str) -> Any:
        from stages.families.qwen.data import special_ids
        from stages.families.qwen.model import build_tiny_model

        return build_tiny_model(name, vocab_size=len(tokenizer), special_ids=special_ids(tokenizer), fusion=fusion)

    def load_base(self, path: str | Path, fusion: str, **kwargs: Any) -> tuple[Any, list[str]]:
        from stages.families.qwen.model import load_base

        return load_base(path, fusion=fusion, **kwargs)

    def layers(self, model: Any) -> tuple[Any, Any]:
        return model.model.visual.blocks, model.model.language_model.layers

    def plan_shapes(self, config: Any, setting: Any) -> Any:
        from stages.families.qwen.memory import plan_shapes

        return plan_shapes(config, setting)

    def vision_layer_bytes(self, s: Any, a: int, r: int, cast: bool, trainable_vit: bool, cross: bool) -> int:
        from stages.families.qwen.memory import vision_layer_bytes

        return vision_layer_bytes(s, a, r, cast, trainable_vit, cross)

    def train_tokenizer(self, texts: list[str], vocab_size: int) -> Any:
        from stages.families.qwen.data import train_tokenizer

        return train_tokenizer(texts, vocab_size)

    def load_tokenizer(self, directory: Path) -> Any:
        from stages.families.qwen.data import load_tokenizer

        return load_tokenizer(directory)

    def data_spec(self, cfg: Any, config: Any) -> Any:
        from stages.families.qwen.data import ImageSpec
        from stages.families.qwen.model import image_budget

        return ImageSpec.of(cfg.base, image_budget(cfg.base, cfg.tiny_model), cfg.max_pixels)

    def spec_from_run(self, config: Any, run_cfg: dict[str, Any]) -> Any:
        from stages.families.qwen.data import ImageSpec
        from stages.families.qwen.model import image_budget

        if run_cfg.get(self.spec_key):
            return ImageSpec.from_dict(run_cfg[self.spec_key])
        base = run_cfg.get("base")
        return ImageSpec.of(base, image_budget(base, run_cfg.get("tiny_model") or "tiny-qwen"))

    def dataset(self, cfg: Any, tokenizer: Any, spec: Any, store: Any) -> Any:
        from stages.families.qwen.data import QwenCritiqueDataset

        return QwenCritiqueDataset(cfg.dataset, cfg.split, tokenizer, spec, store,
                                   cfg.allow_missing_saliency or cfg.saliency == "uniform", cfg.max_length, cfg.limit)

    def collator(self, tokenizer: Any, keep_sample_ids: bool) -> Any:
        from stages.families.qwen.data import IMAGE_PAD, QwenCollator

        return QwenCollator(tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(IMAGE_PAD), keep_sample_ids)

    def captioner(self, model: Any, tokenizer: Any, spec: Any, device: Any = None) -> Any:
        from stages.families.qwen.captioner import QwenCaptioner

        return QwenCaptioner(model, tokenizer, spec, device)
