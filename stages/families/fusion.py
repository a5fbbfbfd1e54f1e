"""How saliency enters a vision tower, for every family: the ``--fusion`` choices, the keys' saliency prior on the
cross-attention logits, and the parameters the fusion adds."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

FUSIONS = ("cross_attention", "none")  # "none": the plain tower (the "w/o IASC" ablation)
NOT_CONFIG_KEYS = ("model_type", "transformers_version", "architectures", "auto_map")  # set by the IAS config class
PRIOR_FLOOR = 0.01  # a key of saliency 0 gets log(0.01) = -4.6 on its logits: 1 % of a fully salient key's weight


def check_fusion(fusion: str, name: str = "fusion") -> None:
    """A ValueError unless ``fusion`` is one of FUSIONS (``name``: the option or config field it came from)."""
    if fusion not in FUSIONS:
        raise ValueError(f"{name} must be one of {FUSIONS}, got {fusion!r}")


def with_fusion(ias_config_class: type, base: Any, fusion: str) -> Any:
    """A family's base (or IAS) config as its IAS config class, with ``fusion``."""
    fields = {k: v for k, v in base.to_dict().items() if k not in NOT_CONFIG_KEYS}
    return ias_config_class(**{**fields, "ias_fusion": fusion})


def saliency_prior(saliency: torch.Tensor) -> torch.Tensor:
    """The keys' saliency [..., N] in [0, 1] as additive attention logits ``log(s + floor)`` [..., N]."""
    return torch.log(saliency.float() + PRIOR_FLOOR)


def is_fusion_parameter(name: str) -> bool:
    """Whether a parameter (by its name in the model) belongs to a layer's saliency cross-attention."""
    return ".cross_attention." in f".{name}"


def cross_attention_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """All parameters the IAS fusion adds (what a base checkpoint of either family lacks)."""
    return [(n, p) for n, p in model.named_parameters() if is_fusion_parameter(n)]
