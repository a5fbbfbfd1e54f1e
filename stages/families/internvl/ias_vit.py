"""IAS-ViT: transformers' InternVL vision tower with saliency cross-attention in every layer.

Each ``InternVLVisionLayer`` (layernorm_before -> attention * lambda_1 -> residual ->
layernorm_after -> mlp * lambda_2 -> residual) gains, between its two residual branches,

    h = h + gate * softmax(q k^T / sqrt(d) + log(s + floor)) v,   q = saliency tokens, k = v = image tokens h

with ``gate`` zero-initialised, so at initialisation the tower equals the pretrained one exactly.
Saliency tokens are the tower's own embeddings (patch + position, CLS slot included) of the
saliency-weighted tile ``pixel_values * saliency_values``, made in the same embedding call as the
image tokens (one patch-embedding pass over both) and shared by all layers. ``s`` is each key
token's saliency (its patch's mean; the tile's mean for CLS): the map is also an attention prior
over the keys, so every query reads mostly from the salient region. Without it the map reached the
output only through the queries, and an output is a convex mix of image-token values: where the
values agree (a uniform region, a window inside one region) the map could not change anything and a
model learnt to ignore where it points (README, "IAS-ViT follows its map"). A uniform map adds a
constant to every logit: no effect. ``fusion="none"`` builds the plain tower (the "w/o IASC" ablation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import (
    NORM2FN,
    InternVLVisionEmbeddings,
    InternVLVisionEncoder,
    InternVLVisionLayer,
    InternVLVisionModel,
    InternVLVisionModelOutputWithPooling,
    InternVLVisionPreTrainedModel,
)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from stages.families.fusion import check_fusion, saliency_prior

class SaliencyCrossAttention(nn.Module):
    """Multi-head cross-attention: queries from saliency tokens, keys/values from image tokens, the keys'
    saliency as an additive prior on the logits."""

    def __init__(self, config: InternVLVisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.norm_query = NORM2FN[config.norm_type](d, eps=config.layer_norm_eps)
        self.norm_context = NORM2FN[config.norm_type](d, eps=config.layer_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, d, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, d, bias=config.attention_bias)
        self.o_proj = nn.Linear(d, d)
        self.gate = nn.Parameter(torch.zeros(d))  # per channel, zero at init (see IASVisionModel._init_weights)

    def forward(self, image_tokens: torch.Tensor, saliency_tokens: torch.Tensor,
                key_prior: torch.Tensor) -> torch.Tensor:
        """image_tokens [B, N, D], saliency_tokens [B, M, D], key_prior [B, N] (``saliency_prior``) -> [B, M, D]."""
        b, n, d = image_tokens.shape
        m = saliency_tokens.shape[1]
        context = self.norm_context(image_tokens)
        q = self.q_proj(self.norm_query(saliency_tokens)).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, N, Dh]
        v = self.v_proj(context).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        bias = key_prior.to(q.dtype)[:, None, None, :]  # [B, 1, 1, N]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, H, M, Dh]
        out = self.o_proj(out.transpose(1, 2).reshape(b, m, d))  # [B, M, D]
        return self.gate * out


class IASVisionLayer(InternVLVisionLayer):
    """``InternVLVisionLayer`` with the gated saliency cross-attention between its residual branches."""

    def __init__(self, config: InternVLVisionConfig) -> None:
        super().__init__(config)
        self.cross_attention = SaliencyCrossAttention(config)

    def forward(self, hidden_states: torch.Tensor, saliency_tokens: torch.Tensor,
                key_prior: torch.Tensor) -> torch.Tensor:
        attention_output, _ = self.attention(self.layernorm_before(hidden_states))
        hidden_states = self.lambda_1 * attention_output + hidden_states  # first residual
        hidden_states = hidden_states + self.cross_attention(hidden_states, saliency_tokens, key_prior)  # saliency
        layer_output = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return self.lambda_2 * layer_output + hidden_states  # second residual


class IASVisionEncoder(InternVLVisionEncoder):
    """The layer stack; saliency tokens and the key prior go to every layer (positionally, for gradient
    checkpointing)."""

    def __init__(self, config: InternVLVisionConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.layer = nn.ModuleList([IASVisionLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, saliency_tokens: torch.Tensor,
                key_prior: torch.Tensor) -> BaseModelOutput:
        for layer_module in self.layer:
            hidden_states = layer_module(hidden_states, saliency_tokens, key_prior)
        return BaseModelOutput(last_hidden_state=hidden_states)


class IASVisionModel(InternVLVisionModel):
    """InternVL vision tower whose forward also takes per-tile saliency maps."""

    def __init__(self, config: InternVLVisionConfig, fusion: str = "cross_attention") -> None:
        check_fusion(fusion)
        InternVLVisionPreTrainedModel.__init__(self, config)
        self.fusion = fusion
        self.embeddings = InternVLVisionEmbeddings(config)
        self.encoder = IASVisionEncoder(config) if fusion == "cross_attention" else InternVLVisionEncoder(config)
        self.layernorm = (
            nn.Identity() if config.use_mean_pooling else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SaliencyCrossAttention):
            init.zeros_(module.gate)

    def embed(
        self, pixel_values: torch.Tensor, saliency_values: torch.Tensor, bool_masked_pos: torch.BoolTensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image tokens, saliency tokens, key prior): the tower's own patch + position embedding of the tiles and
        of tile x saliency tile, each [T, 1+N, D], in one embedding call (the saliency tokens are never masked),
        and ``saliency_prior`` of each token's saliency [T, 1+N] (its patch's mean; CLS: the tile's mean)."""
        t = pixel_values.shape[0]
        weighted = pixel_values * saliency_values.to(pixel_values.dtype)  # [T, 3, S, S]
        if bool_masked_pos is not None:
            bool_masked_pos = torch.cat([bool_masked_pos, torch.zeros_like(bool_masked_pos)])
        tokens = self.embeddings(torch.cat([pixel_values, weighted]), bool_masked_pos=bool_masked_pos)  # [2T, 1+N, D]
        patch = F.avg_pool2d(saliency_values.float(), self.config.patch_size).flatten(1)  # [T, N]
        per_token = torch.cat([patch.mean(1, keepdim=True), patch], 1)  # [T, 1+N]
        return tokens[:t], tokens[t:], saliency_prior(per_token)

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        saliency_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        **kwargs,
    ) -> InternVLVisionModelOutputWithPooling:
        """pixel_values [T, 3, S, S]; saliency_values [T, 1, S, S] in [0, 1] (ignored when fusion is "none")."""
        if self.fusion == "cross_attention":
            if saliency_values is None:
                raise ValueError("IAS-ViT with cross-attention fusion needs saliency_values [T, 1, S, S]")
            encoder_outputs = self.encoder(*self.embed(pixel_values, saliency_values, bool_masked_pos))
        else:
            encoder_outputs = self.encoder(self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos))
        return InternVLVisionModelOutputWithPooling(last_hidden_state=self.layernorm(encoder_outputs[0]))
