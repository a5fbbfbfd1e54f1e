"""IAS for Qwen2.5-VL: transformers' Qwen2.5-VL vision tower with saliency cross-attention in every block.

Each ``Qwen2_5_VLVisionBlock`` (h + attn(norm1(h)) -> h + mlp(norm2(h))) gains, between the two, the
IAS-ViT fusion of stages/families/internvl/ias_vit.py:

    h = h + gate * softmax(q k^T / sqrt(d) + log(s + floor)) v,   q = saliency tokens, k = v = image tokens h

with ``gate`` zero-initialised, so at initialisation the tower equals the pretrained one bit for bit, and
``s`` each key patch's saliency (the map as an attention prior over the keys; see ias_vit.py for why).

Qwen2.5-VL sees native-resolution patches, not fixed tiles, so the saliency side follows the tower:
- one saliency value per 14 x 14 patch: the image's raw map (normalised full-image coordinates) min-max
  normalised, resized bilinearly to the image's smart-resized size (multiples of 28, as the processor
  resizes the image) and area-pooled to the patch grid (:func:`patch_saliency`, on the device);
- the saliency tokens are the tower's own patch embedding of the saliency-weighted patches. The patch
  embedding is a bias-free convolution, so that is the image's patch embedding e times the patch's value s.
  The queries' RMSNorm would erase that factor (RMSNorm(s e) = RMSNorm(e): Qwen2.5-VL's tokens carry no
  bias and no absolute position embedding, unlike InternViT's), so the saliency token is normalised by
  its unweighted patch's RMS: query input = s * RMSNorm(e), the weighting survives;
- the tower's 2-D rotary position embedding is applied to the cross-attention's queries and keys
  (Qwen2.5-VL has no absolute position embedding: rope is its position signal);
- tokens run in the forward's window order, and the cross-attention attends within the same segments as
  the block's self-attention: the window in window-attention blocks, the whole image in the
  ``fullatt_block_indexes`` blocks, never across images. Segments of equal length run as one batched
  attention call with the prior as its additive mask (with flash attention requested too: its kernels take
  no additive mask, so the cross-attention uses sdpa there).
``fusion="none"`` is the unmodified tower (the "w/o IASC" ablation).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionPatchEmbed,
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLPatchMerger,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLRMSNorm,
    Qwen2_5_VLVisionBlock,
    Qwen2_5_VLVisionRotaryEmbedding,
    apply_rotary_pos_emb_vision,
    eager_attention_forward,
)
from transformers.utils.generic import get_max_seqlen, is_flash_attention_requested, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from stages.families.fusion import check_fusion, saliency_prior


# ---------------------------------------------------------------- saliency per patch (on the device)


def _area_weights(size: int, patches: int, patch_size: int, device: torch.device) -> torch.Tensor:
    """[patches, size]: row p averages a length-``size`` signal, bilinearly resized to ``patches * patch_size``
    samples (align_corners=False), over the samples of patch p. Bilinear resizing is separable and linear, so
    these two matrices give the area-pooled resized map in two small matmuls, never the full-size canvas."""
    eye = torch.eye(size, device=device)[None]  # [1, size, size]: one impulse per map cell
    resized = F.interpolate(eye, size=patches * patch_size, mode="linear", align_corners=False)  # [1, size, P*S]
    return F.avg_pool1d(resized, patch_size)[0].T  # [patches, size]


def normalise_map(saliency_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(map min-max normalised to [0, 1], whether it is informative). A constant (or non-finite) map carries
    no saliency information: it is the uniform map, all ones (tiling.uniform_saliency's rule)."""
    m = saliency_map.float()
    lo, hi = m.min(), m.max()
    informative = torch.isfinite(lo) & torch.isfinite(hi) & (hi > lo)  # a 0-d tensor: no host sync
    return torch.where(informative, (m - lo) / torch.where(informative, hi - lo, 1.0), torch.ones_like(m)), informative


def patch_saliency(
    saliency_maps: torch.Tensor | Sequence[torch.Tensor], grid_thw: torch.Tensor, patch_size: int, merge_size: int,
) -> torch.Tensor:
    """One saliency value per patch, in the processor's order (``pixel_values`` rows): [sum t*h*w].

    ``saliency_maps``: one raw map per image ([N, h, w], or a sequence of [h_i, w_i]); ``grid_thw`` [N, 3]
    the images' patch grids. Each map is normalised, resized to the image's size (grid x patch) and
    area-pooled per patch, then laid out as the processor lays out patches: merge blocks row-major, the
    ``merge x merge`` patches of a block row-major inside it, frames one after another.
    """
    if len(saliency_maps) != len(grid_thw):
        raise ValueError(f"{len(saliency_maps)} saliency maps for {len(grid_thw)} images")
    out = []
    for saliency_map, (t, h, w) in zip(saliency_maps, grid_thw.tolist()):
        m, informative = normalise_map(saliency_map)  # [mh, mw]
        rows = _area_weights(m.shape[0], h, patch_size, m.device)  # [h, mh]
        cols = _area_weights(m.shape[1], w, patch_size, m.device)  # [w, mw]
        grid = rows @ m @ cols.T  # [h, w]: the map's mean over each patch's pixels
        grid = torch.where(informative, grid, torch.ones_like(grid))  # uniform: exactly ones
        blocks = grid.view(h // merge_size, merge_size, w // merge_size, merge_size).permute(0, 2, 1, 3)
        out.append(blocks.reshape(-1).repeat(t))  # [t*h*w]
    return torch.cat(out).clamp_(0.0, 1.0)


# ---------------------------------------------------------------- the fusion


class QwenSaliencyCrossAttention(nn.Module):
    """Cross-attention over packed image tokens: queries from saliency tokens, keys/values from image tokens,
    attending only within the segments of ``cu_seqlens`` (windows or whole images), rope on queries and keys,
    the keys' saliency as an additive prior on the logits.

    The same semantics as ias_vit.SaliencyCrossAttention, in Qwen2.5-VL's own terms: RMSNorm, packed
    [N, D] sequences with cu_seqlens, rotary positions, and the block's attention backend.
    """

    def __init__(self, config: Qwen2_5_VLVisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = d // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.num_key_value_groups = 1  # eager attention reads it
        self.norm_query = Qwen2_5_VLRMSNorm(d, eps=1e-6)
        self.norm_context = Qwen2_5_VLRMSNorm(d, eps=1e-6)
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=True)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.o_proj = nn.Linear(d, d)
        self.gate = nn.Parameter(torch.zeros(d))  # per channel, zero at init (see IASQwenVisionModel._init_weights)

    def forward(
        self,
        image_tokens: torch.Tensor,
        patch_tokens: torch.Tensor,
        saliency: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs,
    ) -> torch.Tensor:
        """image_tokens, patch_tokens (the patch embeddings) [N, D] and saliency [N] in window order (the block's
        other keyword arguments, e.g. max_seqlen, are its self-attention's)."""
        n = image_tokens.shape[0]
        context = self.norm_context(image_tokens)
        query = self.norm_query(patch_tokens) * saliency.to(patch_tokens.dtype)[:, None]  # saliency token, RMS-scaled
        q = self.q_proj(query).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(context).view(n, self.num_heads, self.head_dim)  # [N, H, Dh]
        v = self.v_proj(context).view(n, self.num_heads, self.head_dim)
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, N, Dh]
        backend = "sdpa" if is_flash_attention_requested(self.config) else self.config._attn_implementation
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(backend, eager_attention_forward)
        prior = saliency_prior(saliency).to(v.dtype)  # [N]
        out = torch.empty(n, self.num_heads, self.head_dim, dtype=v.dtype, device=v.device)  # [N, H, Dh]
        starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        for length in lengths.unique().tolist():  # segments of equal length batched: most windows are full
            index = (starts[lengths == length][:, None] + torch.arange(length, device=v.device)).reshape(-1)
            qs, ks, vs = (x[0][:, index].unflatten(1, (-1, length)).transpose(0, 1) for x in (q, k, v))
            mask = prior[index].view(-1, 1, 1, length)  # [S, 1, 1, length]
            o, _ = attention(self, qs, ks, vs, attention_mask=mask, scaling=self.scaling, dropout=0.0,
                             is_causal=False)  # [S, length, H, Dh]
            out[index] = o.reshape(-1, self.num_heads, self.head_dim)
        return self.gate * self.o_proj(out.reshape(n, -1))  # [N, D]


class IASQwenVisionBlock(Qwen2_5_VLVisionBlock):
    """``Qwen2_5_VLVisionBlock`` with the gated saliency cross-attention between attention and MLP."""

    def __init__(self, config: Qwen2_5_VLVisionConfig) -> None:
        super().__init__(config)
        self.cross_attention = QwenSaliencyCrossAttention(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        patch_tokens: torch.Tensor,
        saliency: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), cu_seqlens=cu_seqlens,
                                                  position_embeddings=position_embeddings, **kwargs)
        hidden_states = hidden_states + self.cross_attention(hidden_states, patch_tokens, saliency, cu_seqlens,
                                                             position_embeddings, **kwargs)  # saliency residual
        return hidden_states + self.mlp(self.norm2(hidden_states))


class IASQwenVisionModel(Qwen2_5_VisionTransformerPretrainedModel):
    """Qwen2.5-VL vision tower with IAS blocks; its forward also takes each image's raw saliency map.

    (The "w/o IASC" ablation uses the unmodified tower: :func:`vision_tower`.)"""

    def __init__(self, config: Qwen2_5_VLVisionConfig) -> None:
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_size = config.patch_size
        self.fullatt_block_indexes = config.fullatt_block_indexes
        self.window_size = config.window_size
        self.spatial_merge_unit = self.spatial_merge_size * self.spatial_merge_size
        self.patch_embed = Qwen2_5_VisionPatchEmbed(patch_size=config.patch_size,
                                                    temporal_patch_size=config.temporal_patch_size,
                                                    in_channels=config.in_channels, embed_dim=config.hidden_size)
        self.rotary_pos_emb = Qwen2_5_VLVisionRotaryEmbedding(config)
        self.blocks = nn.ModuleList([IASQwenVisionBlock(config) for _ in range(config.depth)])
        self.merger = Qwen2_5_VLPatchMerger(dim=config.out_hidden_size, context_dim=config.hidden_size,
                                            spatial_merge_size=config.spatial_merge_size)
        self.gradient_checkpointing = False
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, QwenSaliencyCrossAttention):
            init.zeros_(module.gate)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        hidden_states: torch.Tensor,
        grid_thw: torch.Tensor,
        saliency_maps: torch.Tensor | Sequence[torch.Tensor] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """hidden_states: ``pixel_values`` [sum t*h*w, C*T*P*P] (the processor's patches); grid_thw [N, 3];
        saliency_maps: one raw map per image ([N, h, w] or a sequence of [h_i, w_i])."""
        if saliency_maps is None:
            raise ValueError("IAS with cross-attention fusion needs saliency_maps (one raw map per image)")
        position_ids = get_vision_position_ids(grid_thw, self.spatial_merge_size, kwargs=kwargs)
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, self.config, kwargs=kwargs)
        window_index, cu_window_seqlens = get_vision_window_index(
            grid_thw, spatial_merge_size=self.spatial_merge_size, window_size=self.window_size,
            patch_size=self.patch_size, kwargs=kwargs)
        max_window_seqlen = get_max_seqlen(cu_window_seqlens, self.config, kwargs=kwargs,
                                           kwarg_name="max_window_seqlen")

        hidden_states = self.patch_embed(hidden_states)  # [N, D], processor order
        saliency = patch_saliency(saliency_maps, grid_thw, self.patch_size, self.spatial_merge_size)  # [N]
        seq_len = hidden_states.shape[0]
        hidden_states = self.permute_input_for_window_attn(hidden_states, window_index, seq_len=seq_len)
        patch_tokens = hidden_states  # the saliency tokens are these times saliency (see the module docstring)
        saliency = self.permute_input_for_window_attn(saliency[:, None], window_index, seq_len=seq_len)[:, 0]
        position_embeddings = self.rotary_pos_emb(hidden_states, position_ids)
        position_embeddings = tuple(self.permute_input_for_window_attn(f, window_index, seq_len=seq_len)
                                    for f in position_embeddings)  # window order, like the tokens

        for layer_num, block in enumerate(self.blocks):
            full = layer_num in self.fullatt_block_indexes
            hidden_states = block(hidden_states, patch_tokens, saliency,  # positional: reentrant checkpointing
                                  cu_seqlens=cu_seqlens if full else cu_window_seqlens,
                                  max_seqlen=max_seqlen if full else max_window_seqlen,
                                  position_embeddings=position_embeddings, **kwargs)

        merged = self.merger(hidden_states)[torch.argsort(window_index)]  # back to the processor's order
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=merged)


def vision_tower(config: Qwen2_5_VLVisionConfig, fusion: str = "cross_attention") -> nn.Module:
    """The IAS tower, or for ``fusion="none"`` the unmodified transformers tower."""
    check_fusion(fusion)
    if fusion == "none":
        return Qwen2_5_VisionTransformerPretrainedModel(config)
    return IASQwenVisionModel(config)
