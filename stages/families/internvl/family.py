"""The InternVL family as the pipeline sees it: its names, configs, model, tokenizer, data and captioner."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.families.family import Family


class InternVL(Family):
    name = "internvl"
    label = "InternVL"
    paper_table = "II"  # the paper's ablation on its InternVL2-8B base
    untrained_run = "untrained"
    spec_key = "tiles"  # run_config.json entry of the data spec
    model_types = ("internvl", "ias_internvl")
    lora_modules = {"vision": "vision_tower", "projector": "multi_modal_projector"}  # peft modules_to_save

    # ---- configs and models
    def tiny_names(self) -> list[str]:
        from stages.families.internvl.configs import TINY_CONFIGS

        return list(TINY_CONFIGS)

    def named_names(self) -> list[str]:
        from stages.families.internvl.configs import NAMED_CONFIGS

        return list(NAMED_CONFIGS)

    def tiny_config(self, name: str, vocab_size: int, fusion: str) -> Any:
        from stages.families.internvl.model import tiny_internvl_config

        return tiny_internvl_config(name, vocab_size=vocab_size, fusion=fusion)

    def named_config(self, name: str, fusion: str) -> Any:
        from stages.families.internvl.model import named_config

        return named_config(name, fusion)

    def ias_config(self, config: Any, fusion: str) -> Any:
        from stages.families.internvl.model import ias_config

        return ias_config(config, fusion)

    def model_class(self) -> type:
        from stages.families.internvl.model import IASInternVLForConditionalGeneration

        return IASInternVLForConditionalGeneration

    def build_tiny(self, name: str, tokenizer: Any, fusion: str) -> Any:
        from stages.families.internvl.model import build_tiny_model
        from stages.families.internvl.tokenizer import IMG_CONTEXT

        return build_tiny_model(name, vocab_size=len(tokenizer), fusion=fusion,
                                image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT))

    def load_base(self, path: str | Path, fusion: str, **kwargs: Any) -> tuple[Any, list[str]]:
        from stages.families.internvl.model import load_base

        return load_base(path, fusion=fusion, **kwargs)

    def layers(self, model: Any) -> tuple[Any, Any]:
        """(vision tower layers, LLM decoder layers) of a model of this family."""
        return model.model.vision_tower.encoder.layer, model.model.language_model.layers

    # ---- memory plan
    def plan_shapes(self, config: Any, setting: Any) -> Any:
        from stages.families.internvl.memory import plan_shapes

        return plan_shapes(config, setting)

    def vision_layer_bytes(self, s: Any, a: int, r: int, cast: bool, trainable_vit: bool, cross: bool) -> int:
        from stages.families.internvl.memory import vision_layer_bytes

        return vision_layer_bytes(s, a, r, cast, trainable_vit, cross)

    # ---- tokenizer
    def train_tokenizer(self, texts: list[str], vocab_size: int) -> Any:
        from stages.families.internvl.tokenizer import train_bpe

        return train_bpe(texts, vocab_size=vocab_size)

    def load_tokenizer(self, directory: Path) -> Any:
        from stages.families.internvl.tokenizer import load_tokenizer

        return load_tokenizer(directory)

    # ---- data
    def data_spec(self, cfg: Any, config: Any) -> Any:
        from stages.families.internvl.dataset import TileSpec
        from stages.families.internvl.model import tile_size, tokens_per_tile

        return TileSpec(tile_size=tile_size(config), min_tiles=cfg.min_tiles, max_tiles=cfg.max_tiles,
                        use_thumbnail=cfg.use_thumbnail, tokens_per_tile=tokens_per_tile(config))

    def spec_from_run(self, config: Any, run_cfg: dict[str, Any]) -> Any:
        """The run's tiling (run_config.json ``tiles``), else the model's tile size with InternVL defaults."""
        from stages.families.internvl.dataset import TileSpec
        from stages.families.internvl.model import tile_size, tokens_per_tile

        if run_cfg.get("tiles"):
            return TileSpec(**run_cfg["tiles"])
        return TileSpec(tile_size=tile_size(config), tokens_per_tile=tokens_per_tile(config))

    def dataset(self, cfg: Any, tokenizer: Any, spec: Any, store: Any) -> Any:
        from stages.families.internvl.dataset import CritiqueDataset

        return CritiqueDataset(cfg.dataset, cfg.split, tokenizer, spec, store,
                               cfg.allow_missing_saliency or cfg.saliency == "uniform", cfg.max_length, cfg.limit)

    def collator(self, tokenizer: Any, keep_sample_ids: bool) -> Any:
        from stages.families.internvl.collate import Collator

        return Collator(tokenizer.pad_token_id, keep_sample_ids=keep_sample_ids)

    # ---- generation
    def captioner(self, model: Any, tokenizer: Any, spec: Any, device: Any = None) -> Any:
        from stages.families.internvl.captioner import InternVLCaptioner

        return InternVLCaptioner(model, tokenizer, spec, device)
