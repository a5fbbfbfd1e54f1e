"""Base model families behind one CLI: InternVL (the paper's base) and Qwen2.5-VL (the Table III analogue).

``--base DIR`` picks the family from ``DIR/config.json``'s ``model_type``; without a base the tiny config
name does (``--tiny-model demo`` or ``demo-qwen``); a run's ``run_config.json`` records its family for
the report. Each family adapts the modules of its folder (internvl/, qwen/) to the few calls training,
planning and generation make. Heavy imports stay
inside the methods.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


class FamilyError(PipelineError, ValueError):
    """A base or tiny model no family supports."""


class Family:
    """What a base family declares; InternVL and Qwen25VL implement the same methods (documented on InternVL)."""

    name: str  # recorded in run_config.json
    label: str  # for people (tables, messages)
    paper_table: str  # the paper's ablation table of the family's base ("II" | "III")
    untrained_run: str  # run name of the family's base before fine-tuning (the baseline row)
    spec_key: str  # run_config.json entry of the data spec
    model_types: tuple[str, ...]  # config.json model_type values of the family's checkpoints
    lora_modules: dict[str, str]  # part -> module name kept fully trainable beside LoRA (peft modules_to_save)


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
        from stages.families.internvl.model import TINY_CONFIGS

        return list(TINY_CONFIGS)

    def named_names(self) -> list[str]:
        from stages.families.internvl.model import NAMED_CONFIGS

        return list(NAMED_CONFIGS)

    def tiny_config(self, name: str, vocab_size: int, fusion: str) -> Any:
        from stages.families.internvl.model import tiny_internvl_config

        return tiny_internvl_config(name, vocab_size=vocab_size, fusion=fusion)

    def named_config(self, name: str, fusion: str) -> Any:
        from stages.families.internvl.model import named_config

        return named_config(name, fusion)

    def ias_config(self, config: Any, fusion: str) -> Any:
        from transformers.models.internvl.configuration_internvl import InternVLConfig

        from stages.families.internvl.model import _NOT_CONFIG_KEYS, IASInternVLConfig

        if not isinstance(config, InternVLConfig):
            raise ValueError(f"expected an InternVL config, got model_type '{config.model_type}'")
        fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_CONFIG_KEYS}
        return IASInternVLConfig(**{**fields, "ias_fusion": fusion})

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

    # ---- tokenizer
    def dataset_tokenizer(self, texts: list[str], directory: Path, vocab_size: int) -> Any:
        from stages.families.internvl.tokenizer import dataset_tokenizer

        return dataset_tokenizer(texts, directory, vocab_size)

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


class Qwen25VL(Family):
    name = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    paper_table = "III"  # the paper's second base, Qwen-VL-Chat: a different (older, remote-code) model
    untrained_run = "untrained-qwen2.5-vl"
    spec_key = "image"
    model_types = ("qwen2_5_vl", "ias_qwen2_5_vl")
    lora_modules = {"vision": "visual", "projector": "merger"}

    def tiny_names(self) -> list[str]:
        from stages.families.qwen.model import TINY_CONFIGS

        return list(TINY_CONFIGS)

    def named_names(self) -> list[str]:
        from stages.families.qwen.model import NAMED_CONFIGS

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

    def dataset_tokenizer(self, texts: list[str], directory: Path, vocab_size: int) -> Any:
        from stages.families.qwen.data import dataset_tokenizer

        return dataset_tokenizer(texts, directory, vocab_size)

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


FAMILIES = {f.name: f for f in (InternVL(), Qwen25VL())}
DEFAULT = FAMILIES["internvl"]


def by_model_type(model_type: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    if model_type == "internvl_chat":  # an original InternVL2 checkpoint: load_base says to convert it
        return DEFAULT
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise FamilyError(f"model_type '{model_type}' is no supported base family (supported: {known})")


def of_base(path: str | Path) -> Family:
    """The family of a checkpoint dir (or its config.json), from ``model_type``."""
    path = Path(path)
    file = path if path.is_file() else path / "config.json"
    if not file.exists():
        raise FamilyError(f"{path}: no config.json (expected a local Hugging Face checkpoint directory)")
    return by_model_type(json.loads(file.read_text()).get("model_type", ""))


def of_name(name: str) -> Family | None:
    """The family of a registered tiny or named config (None when no family registers it)."""
    for family in FAMILIES.values():
        if name in family.tiny_names() or name in family.named_names():
            return family
    return None


def of_tiny(name: str) -> Family:
    family = of_name(name)
    if family is None or name not in family.tiny_names():
        known = ", ".join(n for f in FAMILIES.values() for n in f.tiny_names())
        raise FamilyError(f"unknown tiny model {name!r} (known: {known})")
    return family


def of_train(base: str | None, tiny_model: str) -> Family:
    """The family of a fine-tuning run: its base's, else its tiny model's."""
    return of_base(base) if base else of_tiny(tiny_model)


def of_config(config: Any) -> Family:
    return by_model_type(config.model_type)


def of_run(run_cfg: dict[str, Any]) -> Family:
    """The family a run recorded in run_config.json (runs from before the registry are InternVL)."""
    return FAMILIES[run_cfg.get("family", DEFAULT.name)]


def check_run(run_dir: Path, family: Family) -> None:
    """A run dir holds one family's checkpoints: resuming it with another base family is an error."""
    file = Path(run_dir) / "run_config.json"
    recorded = of_run(json.loads(file.read_text())) if file.exists() else family
    if recorded is not family:
        raise FamilyError(f"{run_dir} holds a {recorded.label} run; this one is {family.label}: choose another --run")


def spec_record(family: Family, spec: Any) -> dict[str, Any]:
    """run_config.json entries of a run's data spec."""
    return {"family": family.name, family.spec_key: asdict(spec)}
