"""ASE-MLLM on Qwen2.5-VL: transformers' Qwen2.5-VL with the IAS vision tower (stages/families/qwen/vit.py).

The second base family (the paper's Table III uses Qwen-VL-Chat, remote code only; its native successor
in transformers is Qwen2.5-VL). IAS tower -> the tower's own 2x2 patch merger (RMSNorm, Linear, GELU,
Linear: the projector) -> Qwen2.5 LLM with 3-D (m-)rope, exactly as ``Qwen2_5_VLForConditionalGeneration``;
the only additions are the ``saliency_maps`` input (one raw map per image, expanded to patches on the
device) and the config field ``ias_fusion`` ("cross_attention" | "none": the "w/o IASC" ablation).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
)
from transformers.utils.generic import accepts_precomputed_kwargs, can_return_tuple

from stages.families.fusion import check_fusion, with_fusion
from stages.families.qwen.configs import NAMED_CONFIGS, SPECIAL_IDS, TINY_CONFIGS
from stages.families.qwen.vit import IASQwenVisionModel, vision_tower

IGNORE_INDEX = -100


@strict
class IASQwen2_5_VLConfig(Qwen2_5_VLConfig):
    """``Qwen2_5_VLConfig`` plus the saliency fusion switch."""

    model_type = "ias_qwen2_5_vl"
    ias_fusion: str = "cross_attention"

    def __post_init__(self, **kwargs: Any) -> None:
        check_fusion(self.ias_fusion, "ias_fusion")
        super().__post_init__(**kwargs)


class IASQwen2_5_VLModel(Qwen2_5_VLModel):
    """``Qwen2_5_VLModel`` whose vision tower is the IAS tower."""

    config_class = IASQwen2_5_VLConfig
    accepts_loss_kwargs = True  # as the InternVL family: the Trainer passes the batch's label count

    def __init__(self, config: IASQwen2_5_VLConfig) -> None:
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.visual = vision_tower(config.vision_config, config.ias_fusion)
        self.language_model = Qwen2_5_VLTextModel._from_config(config.text_config)
        self.rope_deltas = None
        self.post_init()

    @accepts_precomputed_kwargs(modality="image")
    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.LongTensor | None = None,
        saliency_maps: torch.Tensor | list[torch.Tensor] | None = None,
        **kwargs: Any,
    ):
        """IAS tower -> merger; ``pooler_output`` is a tuple of [tokens of image i, D_text]."""
        if isinstance(self.visual, IASQwenVisionModel):
            kwargs["saliency_maps"] = saliency_maps
        out = self.visual(pixel_values.type(self.visual.dtype), grid_thw=image_grid_thw, **kwargs)
        tokens = image_grid_thw.prod(-1) // self.visual.spatial_merge_size**2  # [N] LLM tokens per image
        out.pooler_output = torch.split(out.pooler_output, tokens.tolist())
        return out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        saliency_maps: torch.Tensor | list[torch.Tensor] | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs: Any,
    ):
        if pixel_values is not None:
            if mm_encoder_outputs and mm_encoder_outputs.get("image") is not None:
                raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
            image = self.get_image_features(pixel_values, image_grid_thw, saliency_maps=saliency_maps, return_dict=True)
            mm_encoder_outputs = {**(mm_encoder_outputs or {}), "image": image}
        return super().forward(input_ids=input_ids, image_grid_thw=image_grid_thw,
                               mm_encoder_outputs=mm_encoder_outputs, **kwargs)


class IASQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """ASE-MLLM on Qwen2.5-VL: the chat model with saliency-enhanced vision."""

    config_class = IASQwen2_5_VLConfig
    accepts_loss_kwargs = True

    def __init__(self, config: IASQwen2_5_VLConfig) -> None:
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = IASQwen2_5_VLModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None,
                           saliency_maps: torch.Tensor | list[torch.Tensor] | None = None, **kwargs: Any):
        return self.model.get_image_features(pixel_values, image_grid_thw, saliency_maps=saliency_maps, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        saliency_maps: torch.Tensor | list[torch.Tensor] | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        **kwargs: Any,
    ):
        """pixel_values [sum patches, C*T*P*P] and image_grid_thw [N, 3] as the Qwen2.5-VL processor makes them,
        saliency_maps one raw map per image ([N, h, w]); input_ids hold ``image_token_id`` x (patches / 4) per
        image and ``mm_token_type_ids`` (1 there) places the 3-D rope. With labels, logits are computed only
        where a label is predicted: ``logits`` is then [N_labelled, V] (as the InternVL family, model.py).

        (Generation reads which inputs the model takes from this signature: hence every argument is named.)
        """
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                      inputs_embeds=inputs_embeds, use_cache=use_cache, pixel_values=pixel_values,
                      image_grid_thw=image_grid_thw, saliency_maps=saliency_maps, mm_token_type_ids=mm_token_type_ids,
                      mm_encoder_outputs=mm_encoder_outputs, **kwargs)
        if labels is None or not isinstance(logits_to_keep, int) or logits_to_keep != 0:
            return super().forward(labels=labels, logits_to_keep=logits_to_keep, **inputs)
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # [B, L]: the token each position predicts
        keep = shift_labels != IGNORE_INDEX  # [B, L]
        out = super().forward(logits_to_keep=keep, **inputs)  # logits [N_labelled, V]
        out.loss = self.loss_function(logits=out.logits, labels=None, shift_labels=shift_labels[keep],
                                      vocab_size=self.config.text_config.vocab_size, **kwargs)
        return out


# same on-disk key layout as Qwen2.5-VL checkpoints (transformers renames them by class name on load / save)
for _ours, _theirs in ((IASQwen2_5_VLForConditionalGeneration, "Qwen2_5_VLForConditionalGeneration"),
                       (IASQwen2_5_VLModel, "Qwen2_5_VLModel")):
    if get_checkpoint_conversion_mapping(_ours.__name__) is None:
        register_checkpoint_conversion_mapping(_ours.__name__, get_checkpoint_conversion_mapping(_theirs))
AutoConfig.register(IASQwen2_5_VLConfig.model_type, IASQwen2_5_VLConfig, exist_ok=True)
AutoModel.register(IASQwen2_5_VLConfig, IASQwen2_5_VLModel, exist_ok=True)
AutoModelForImageTextToText.register(IASQwen2_5_VLConfig, IASQwen2_5_VLForConditionalGeneration, exist_ok=True)


def tiny_config(name: str = "tiny-qwen", vocab_size: int = 1024, special_ids: dict[str, int] | None = None,
                fusion: str = "cross_attention") -> IASQwen2_5_VLConfig:
    """A registered small config; ``special_ids`` (image / video / vision start / end token ids) default to
    the last four vocab ids (they must lie inside the vocab)."""
    if name not in TINY_CONFIGS:
        raise KeyError(f"unknown tiny config {name!r} (known: {', '.join(TINY_CONFIGS)})")
    ids = special_ids or dict(zip(SPECIAL_IDS, range(vocab_size - 4, vocab_size)))
    bad = {k: v for k, v in ids.items() if not 0 <= v < vocab_size}
    if bad:
        raise ValueError(f"special token ids {bad} must lie inside the vocab (size {vocab_size})")
    vision, text, _ = TINY_CONFIGS[name]
    return IASQwen2_5_VLConfig(
        vision_config=Qwen2_5_VLVisionConfig(**vision, out_hidden_size=text["hidden_size"]),
        text_config=Qwen2_5_VLTextConfig(**text, vocab_size=vocab_size, max_position_embeddings=4096,
                                         bos_token_id=None, eos_token_id=None),  # the tokenizer's, at generation
        tie_word_embeddings=True, ias_fusion=fusion, **ids)


def named_config(name: str, fusion: str = "cross_attention") -> IASQwen2_5_VLConfig:
    """An IASQwen2_5_VLConfig of a registered real shape (no weights)."""
    if name not in NAMED_CONFIGS:
        raise KeyError(f"unknown config {name!r} (known: {', '.join(NAMED_CONFIGS)})")
    spec = NAMED_CONFIGS[name]
    return IASQwen2_5_VLConfig(vision_config=Qwen2_5_VLVisionConfig(**spec["vision"]),
                               text_config=Qwen2_5_VLTextConfig(**spec["text"]),
                               tie_word_embeddings=spec["tie_word_embeddings"], ias_fusion=fusion, **SPECIAL_IDS)


def build_tiny_model(name: str = "tiny-qwen", vocab_size: int = 1024, special_ids: dict[str, int] | None = None,
                     fusion: str = "cross_attention") -> IASQwen2_5_VLForConditionalGeneration:
    """Randomly initialised ASE-MLLM (Qwen2.5-VL family) of a registered tiny shape (seed torch first)."""
    return IASQwen2_5_VLForConditionalGeneration(tiny_config(name, vocab_size, special_ids, fusion))


def ias_config(base: Any, fusion: str = "cross_attention") -> IASQwen2_5_VLConfig:
    """The IAS config of a Qwen2.5-VL (or IAS Qwen2.5-VL) config."""
    if not isinstance(base, Qwen2_5_VLConfig):
        raise ValueError(f"expected a Qwen2.5-VL config (model_type 'qwen2_5_vl'), got '{base.model_type}'")
    return with_fusion(IASQwen2_5_VLConfig, base, fusion)


def load_base(path: Path | str, fusion: str = "cross_attention",
              **from_pretrained_kwargs: Any) -> tuple[IASQwen2_5_VLForConditionalGeneration, list[str]]:
    """Load a local Qwen2.5-VL checkpoint dir (e.g. Qwen2.5-VL-7B-Instruct, or an ASE-MLLM one) into the IAS model.

    Returns the model and the checkpoint's missing keys: for a base Qwen2.5-VL checkpoint exactly the new
    cross-attention parameters (zero-gated, so the model starts as the base). Weights load as fp32 unless
    ``dtype`` says otherwise (the training master weights; see precision.py).
    """
    from_pretrained_kwargs.setdefault("dtype", torch.float32)
    config = ias_config(AutoConfig.from_pretrained(path), fusion)
    model, info = IASQwen2_5_VLForConditionalGeneration.from_pretrained(path, config=config, output_loading_info=True,
                                                                         **from_pretrained_kwargs)
    return model, sorted(info["missing_keys"])


def image_budget(path: Path | str | None, tiny_model: str) -> dict[str, int]:
    """The image processor's pixel budget: a base's ``preprocessor_config.json``, else the tiny config's."""
    if path is not None:
        file = Path(path) / "preprocessor_config.json"
        cfg = json.loads(file.read_text()) if file.exists() else {}
        size = cfg.get("size") or {}
        return dict(min_pixels=int(cfg.get("min_pixels", size.get("shortest_edge", 56 * 56))),
                    max_pixels=int(cfg.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))))
    return dict(TINY_CONFIGS[tiny_model][2])
