"""The trainable parts of an ASE-MLLM (either family) and which parameters LoRA adapts."""
from __future__ import annotations

from stages.families.fusion import is_fusion_parameter

PARTS = ("vision", "cross_attention", "projector", "llm")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def part_of(name: str) -> str | None:
    """Which trainable part a parameter belongs to (None: unknown)."""
    if is_fusion_parameter(name):  # the parameters the IAS fusion adds
        return "cross_attention"
    if "multi_modal_projector" in name or ".visual.merger." in f".{name}":  # Qwen2.5-VL's projector: its merger
        return "projector"
    if "vision_tower" in name or ".visual." in f".{name}":
        return "vision"
    if "language_model" in name or "lm_head" in name:
        return "llm"
    return None
