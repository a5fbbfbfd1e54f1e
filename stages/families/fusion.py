"""How saliency enters a vision tower, for every family: the ``--fusion`` choices, the keys' saliency prior on the
cross-attention logits, and the parameters the fusion adds."""
from __future__ import annotations

import torch
from torch import nn

FUSIONS = ("cross_attention", "none")  # "none": the plain tower (the "w/o IASC" ablation)
PRIOR_FLOOR = 0.01  # a key of saliency 0 gets log(0.01) = -4.6 on its logits: 1 % of a fully salient key's weight


def saliency_prior(saliency: torch.Tensor) -> torch.Tensor:
    """The keys' saliency [..., N] in [0, 1] as additive attention logits ``log(s + floor)`` [..., N]."""
    return torch.log(saliency.float() + PRIOR_FLOOR)


def is_fusion_parameter(name: str) -> bool:
    """Whether a parameter (by its name in the model) belongs to a layer's saliency cross-attention."""
    return ".cross_attention." in f".{name}"


def cross_attention_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """All parameters the IAS fusion adds (what a base checkpoint of either family lacks)."""
    return [(n, p) for n, p in model.named_parameters() if is_fusion_parameter(n)]
