"""ASE-MLLM model: transformers' InternVL with the IAS-ViT vision tower.

IAS-ViT (stages/families/internvl/ias_vit.py) -> pixel shuffle (1/4 tokens) -> projector (LayerNorm, Linear,
GELU, Linear) -> LLM, exactly as ``InternVLForConditionalGeneration``; the only additions are the
saliency inputs (per image: its raw map and its tile grid, ``collate.saliency_inputs``; cut into
saliency tiles aligned with ``pixel_values`` on the model's device by ``tiling.expand_saliency``),
uint8 tiles normalised on the device (``tiling.normalise_tiles``), and the config field ``ias_fusion``
("cross_attention" | "none": the "w/o IASC" ablation).

A training step reads nothing back from the device: map sizes and tile grids arrive as host lists, the
labelled positions as an index the collator built (``collate.label_index``), and the image-token count
is fixed by how prompts are built (tiles x tokens per tile), so it is not counted again on the device.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, Qwen2Config
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.internvl.configuration_internvl import InternVLConfig, InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import (
    InternVLCausalLMOutputWithPast,
    InternVLForConditionalGeneration,
    InternVLModel,
    InternVLModelOutputWithPast,
    InternVLMultiModalProjector,
    InternVLPreTrainedModel,
)

from stages.families.fusion import check_fusion, with_fusion
from stages.families.internvl.configs import NAMED_CONFIGS, TINY_CONFIGS
from stages.families.internvl.ias_vit import IASVisionModel
from stages.families.internvl.collate import label_index
from stages.families.internvl.tiling import expand_saliency, normalise_tiles

IGNORE_INDEX = -100  # label of positions without loss (prompting.IGNORE)


@strict
class IASInternVLConfig(InternVLConfig):
    """``InternVLConfig`` plus the saliency fusion switch."""

    model_type = "ias_internvl"
    ias_fusion: str = "cross_attention"

    def __post_init__(self, **kwargs: Any) -> None:
        check_fusion(self.ias_fusion, "ias_fusion")
        super().__post_init__(**kwargs)


class IASInternVLModel(InternVLModel):
    """``InternVLModel`` whose vision tower is IAS-ViT."""

    config_class = IASInternVLConfig

    def __init__(self, config: IASInternVLConfig) -> None:
        InternVLPreTrainedModel.__init__(self, config)
        self.vision_tower = IASVisionModel(config.vision_config, fusion=config.ias_fusion)
        self.multi_modal_projector = InternVLMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        saliency_maps: torch.Tensor | None = None,
        saliency_map_sizes: Sequence[tuple[int, int]] | None = None,
        tile_grids: Sequence[tuple[int, int, int]] | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ):
        """IAS-ViT -> pixel shuffle -> projector; ``pooler_output`` is [T, tokens per tile, D_text].

        pixel_values [T, 3, S, S] (uint8 tiles, normalised here into the patch embedding's dtype, or pixel values
        already normalised); saliency_maps [B, H, W], saliency_map_sizes [(h, w)] and tile_grids [(cols, rows,
        thumbnail)] for the B images whose tiles make up ``pixel_values`` (``collate.saliency_inputs``; not needed
        without fusion).
        """
        if pixel_values.dtype == torch.uint8:
            weight = self.vision_tower.embeddings.patch_embeddings.projection.weight
            pixel_values = normalise_tiles(pixel_values, weight.dtype)
        saliency_values = None
        if self.config.ias_fusion == "cross_attention":
            saliency_values = self.saliency_tiles(pixel_values, saliency_maps, saliency_map_sizes, tile_grids)
        return super().get_image_features(
            pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            saliency_values=saliency_values,  # travels through **kwargs to the vision tower
            **kwargs,
        )

    @staticmethod
    def saliency_tiles(pixel_values: torch.Tensor, saliency_maps: torch.Tensor | None,
                       saliency_map_sizes: Sequence[tuple[int, int]] | None,
                       tile_grids: Sequence[tuple[int, int, int]] | None) -> torch.Tensor:
        """The saliency tile of every tile of ``pixel_values``, made on its device: [T, 1, S, S]."""
        if saliency_maps is None or saliency_map_sizes is None or tile_grids is None:
            raise ValueError("IAS-ViT with cross-attention fusion needs saliency_maps, saliency_map_sizes and "
                             "tile_grids (stages/families/internvl/collate.py saliency_inputs)")
        tiles = expand_saliency(saliency_maps.to(pixel_values.device), saliency_map_sizes, tile_grids,
                                pixel_values.shape[-1])
        if tiles.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"tile_grids describe {tiles.shape[0]} tiles but pixel_values holds {pixel_values.shape[0]}")
        return tiles  # [T, 1, S, S]

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor) -> torch.Tensor:
        """Where the image features go: [B, L, 1]. transformers also counts the image tokens against the features,
        which reads the count back from the device on every forward; here every prompt is built with tiles x tokens
        per tile image tokens (``prompting.encode_example`` / ``prompt_ids``), so the mask is all that is made."""
        if input_ids is None:
            return super().get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
        return (input_ids == self.config.image_token_id).unsqueeze(-1).to(inputs_embeds.device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        saliency_maps: torch.Tensor | None = None,
        saliency_map_sizes: Sequence[tuple[int, int]] | None = None,
        tile_grids: Sequence[tuple[int, int, int]] | None = None,
        mm_encoder_outputs: dict | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> InternVLModelOutputWithPast:
        if pixel_values is not None:
            if mm_encoder_outputs and mm_encoder_outputs.get("image") is not None:
                raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
            image = self.get_image_features(
                pixel_values,
                saliency_maps=saliency_maps,
                saliency_map_sizes=saliency_map_sizes,
                tile_grids=tile_grids,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                return_dict=True,
            )
            mm_encoder_outputs = {**(mm_encoder_outputs or {}), "image": image}
        return super().forward(input_ids=input_ids, mm_encoder_outputs=mm_encoder_outputs, **kwargs)


class IASInternVLForConditionalGeneration(InternVLForConditionalGeneration):
    """ASE-MLLM: InternVL chat model with saliency-enhanced vision (IAS-ViT)."""

    config_class = IASInternVLConfig

    def __init__(self, config: IASInternVLConfig) -> None:
        InternVLPreTrainedModel.__init__(self, config)
        self.model = IASInternVLModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any):
        """IAS-ViT -> pixel shuffle -> projector (``IASInternVLModel.get_image_features``: same saliency inputs)."""
        return self.model.get_image_features(pixel_values, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        saliency_maps: torch.Tensor | None = None,
        saliency_map_sizes: Sequence[tuple[int, int]] | None = None,
        tile_grids: Sequence[tuple[int, int, int]] | None = None,
        labels: torch.LongTensor | None = None,
        label_positions: torch.LongTensor | None = None,
        label_targets: torch.LongTensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs: Any,
    ) -> InternVLCausalLMOutputWithPast:
        """pixel_values [T_total, 3, S, S]; per image its raw saliency map, the map's size and its tile grid
        (saliency_maps [B_img, H, W], host lists saliency_map_sizes and tile_grids: collate.saliency_inputs);
        input_ids hold ``image_token_id`` x (tokens per tile x T_total); labels -100 are ignored by the loss.

        With labels, logits are computed only where a label is predicted (the critique tokens; not the
        thousands of image tokens): ``logits`` is then [N_labelled, V] and the loss is the causal-LM
        loss over exactly those positions, as transformers computes it over the full [B, L, V]. The collator
        passes those positions (label_positions [N] into the flattened [B * L], label_targets [N]:
        ``collate.label_index``) with a right-padded batch, whose attention mask is then not needed (causal
        attention never reaches a later pad) and is not handed on: transformers would read it on the host to
        see whether it can be skipped. Without them they are made from ``labels`` here (a read from the device).
        """
        saliency = dict(saliency_maps=saliency_maps, saliency_map_sizes=saliency_map_sizes, tile_grids=tile_grids)
        if labels is None or "logits_to_keep" in kwargs:
            return super().forward(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                labels=labels,
                mm_encoder_outputs=mm_encoder_outputs,
                **saliency,  # through **kwargs to IASInternVLModel.forward
                **kwargs,
            )
        if label_positions is None or label_targets is None:
            label_positions, label_targets = (t.to(labels.device) for t in label_index(labels.cpu()))
        else:
            attention_mask = None  # a collated (right-padded) batch
        out = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            mm_encoder_outputs=mm_encoder_outputs,
            **saliency,
            **kwargs,
        )
        hidden = out.last_hidden_state.flatten(0, 1).index_select(0, label_positions)  # [N_labelled, D]
        logits = self.lm_head(hidden)  # [N_labelled, V]
        loss = self.loss_function(logits=logits, labels=None, shift_labels=label_targets,
                                  vocab_size=self.config.text_config.vocab_size, **kwargs)
        return InternVLCausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                              attentions=out.attentions, image_outputs=out.image_outputs)


# same on-disk key layout as InternVL -hf checkpoints (transformers renames InternVL keys on load / save)
if get_checkpoint_conversion_mapping(IASInternVLConfig.model_type) is None:
    register_checkpoint_conversion_mapping(IASInternVLConfig.model_type, get_checkpoint_conversion_mapping("internvl"))
AutoConfig.register(IASInternVLConfig.model_type, IASInternVLConfig, exist_ok=True)
AutoModel.register(IASInternVLConfig, IASInternVLModel, exist_ok=True)
AutoModelForImageTextToText.register(IASInternVLConfig, IASInternVLForConditionalGeneration, exist_ok=True)


def tiny_internvl_config(
    name: str = "tiny", vocab_size: int = 1024, image_token_id: int | None = None, fusion: str = "cross_attention"
) -> IASInternVLConfig:
    """A registered small config; ``image_token_id`` defaults to the last vocab id (it must lie inside the vocab)."""
    if name not in TINY_CONFIGS:
        raise KeyError(f"unknown tiny config {name!r} (known: {', '.join(TINY_CONFIGS)})")
    image_token_id = vocab_size - 1 if image_token_id is None else image_token_id
    if not 0 <= image_token_id < vocab_size:
        raise ValueError(f"image_token_id {image_token_id} must lie inside the vocab (size {vocab_size})")
    vision_kwargs, text_fn = TINY_CONFIGS[name]
    vision = InternVLVisionConfig(**vision_kwargs)
    downsample_ratio = 0.5
    grid = vision.image_size[0] // vision.patch_size[0]
    return IASInternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text_fn(vocab_size)),
        image_token_id=image_token_id,
        image_seq_length=int(grid * downsample_ratio) ** 2,
        downsample_ratio=downsample_ratio,
        ias_fusion=fusion,
    )


def build_tiny_model(
    name: str = "tiny", vocab_size: int = 1024, image_token_id: int | None = None, fusion: str = "cross_attention"
) -> IASInternVLForConditionalGeneration:
    """Randomly initialised ASE-MLLM of a registered tiny shape (seed torch first for determinism)."""
    return IASInternVLForConditionalGeneration(tiny_internvl_config(name, vocab_size, image_token_id, fusion))


def tokens_per_tile(config: InternVLConfig) -> int:
    """LLM image tokens per tile after pixel shuffle (256 for 448 px tiles, patch 14)."""
    grid = config.vision_config.image_size[0] // config.vision_config.patch_size[0]
    return int(grid * config.downsample_ratio) ** 2


def tile_size(config: Any) -> int:
    """Tile side in pixels: the vision tower's input size."""
    size = config.vision_config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def named_config(name: str, fusion: str = "cross_attention") -> IASInternVLConfig:
    """An IASInternVLConfig of a registered real shape."""
    if name not in NAMED_CONFIGS:
        raise KeyError(f"unknown config {name!r} (known: {', '.join(NAMED_CONFIGS)})")
    spec = NAMED_CONFIGS[name]
    text = dict(spec["text"])
    text_config = AutoConfig.for_model(text.pop("model_type"), **text)
    return IASInternVLConfig(vision_config=InternVLVisionConfig(**spec["vision"]), text_config=text_config,
                             image_token_id=text_config.vocab_size - 1, image_seq_length=256, downsample_ratio=0.5,
                             ias_fusion=fusion, tie_word_embeddings=text_config.tie_word_embeddings)


def ias_config(base: Any, fusion: str = "cross_attention") -> IASInternVLConfig:
    """The IAS config of an InternVL (or IAS InternVL) config."""
    if not isinstance(base, InternVLConfig):
        raise ValueError(f"expected an InternVL config, got model_type '{base.model_type}'")
    return with_fusion(IASInternVLConfig, base, fusion)


def load_base(
    path: Path | str, fusion: str = "cross_attention", **from_pretrained_kwargs: Any
) -> tuple[IASInternVLForConditionalGeneration, list[str]]:
    """Load a local InternVL ``-hf`` checkpoint dir (one written by ``convert-base``, or an ASE-MLLM one) into the
    IAS model.

    Returns the model and the checkpoint's missing keys: for a base InternVL checkpoint exactly the
    new cross-attention parameters (zero-gated, so the model starts as the base model). Weights load
    as fp32 unless ``dtype`` says otherwise (the training master weights; see precision.py), whatever
    dtype the checkpoint was saved in.
    """
    config_file = Path(path) / "config.json"
    if config_file.exists() and json.loads(config_file.read_text()).get("model_type") == "internvl_chat":
        from stages.families.internvl.convert import ConversionError

        raise ConversionError(f"{path}: an original InternVL checkpoint (remote code, never run here): convert it "
                              f"once with `ase-mllm convert-base {path} OUT_DIR` and pass OUT_DIR as the base")
    from_pretrained_kwargs.setdefault("dtype", torch.float32)
    base = AutoConfig.from_pretrained(path)
    if not isinstance(base, InternVLConfig):
        raise ValueError(f"{path}: expected an InternVL (-hf, model_type 'internvl') checkpoint, got '{base.model_type}'")
    config = ias_config(base, fusion)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its key table would repeat what the callers report in one line
    try:
        model, info = IASInternVLForConditionalGeneration.from_pretrained(
            path, config=config, output_loading_info=True, **from_pretrained_kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, sorted(info["missing_keys"])
