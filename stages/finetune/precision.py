"""The training precision policy: what each tensor is stored in and what the matmuls run in.

- Trainable parameters, their gradients and the AdamW states are fp32 (master weights). A bf16
  checkpoint is upcast on load: AdamW's first steps move a weight by about ``lr`` (4e-5), far
  below bf16's resolution (2^-8 relative), so bf16 master weights would mostly not move at all.
- Compute runs under autocast: bf16 on GPUs that support it, fp16 with loss scaling on older
  GPUs, fp32 on CPU (``--precision`` overrides; bf16 autocast also runs on CPU).
- Frozen weight matrices get no update, so under DDP they are stored in the compute dtype (half
  the memory of a frozen 8B LLM under LoRA). Under FSDP every parameter stays fp32 and FSDP2 casts
  a gathered layer to the compute dtype itself (one dtype per sharded group); it reduce-scatters the
  gradients in fp32 (sharding.fsdp_mixed_precision).
- ZeRO-3 is DeepSpeed's own policy, not ours: with bf16 (fp16) on, it casts every weight, trainable
  and frozen, to bf16, reduces and accumulates gradients in bf16 (its ``grad_accum_dtype`` defaults
  to the model dtype) and keeps fp32 master copies of the trainable weights with fp32 AdamW states
  in its optimizer; the forward runs in the weights' dtype, without autocast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stages.finetune.sharding import strategy as strategy_named

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    compute: str  # "bf16" | "fp16" | "fp32": autocast dtype of the forward / backward
    frozen: str  # storage of frozen parameters
    device: str  # "cuda" | "cpu"
    strategy: str = "ddp"  # sharding.py; zero3 casts the weights itself (DeepSpeed's mixed precision, see above)

    @property
    def trainer_flags(self) -> dict[str, bool]:
        """The HF Trainer's switches: bf16 / fp16 autocast (fp16 adds its GradScaler)."""
        return {"bf16": self.compute == "bf16", "fp16": self.compute == "fp16"}

    def line(self) -> str:
        scaler = " + dynamic loss scaling" if self.compute == "fp16" else ""
        if strategy_named(self.strategy).engine_casts_weights and self.compute != "fp32":
            return (f"finetune: precision on {self.device} (DeepSpeed ZeRO-3): every weight, trainable and frozen, "
                    f"held in {self.compute}; gradients reduced and accumulated in {self.compute}{scaler}; fp32 "
                    f"master copies of the trainable weights and fp32 AdamW states in DeepSpeed's optimizer; "
                    f"compute {self.compute} (the weights' dtype, no autocast)")
        compute = f"{self.compute} autocast{scaler}" if self.compute != "fp32" else "fp32"
        return (f"finetune: precision on {self.device}: trainable weights, gradients and AdamW states fp32; "
                f"compute {compute}; frozen weights {self.frozen}")


def choose(precision: str = "auto", strategy: str = "ddp", cuda: bool | None = None,
           bf16_supported: bool | None = None) -> Precision:
    """The policy for this machine (``cuda`` / ``bf16_supported`` default to what torch reports)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if bf16_supported is None:
        bf16_supported = cuda and torch.cuda.is_bf16_supported()
    compute = precision
    if precision == "auto":
        compute = ("bf16" if bf16_supported else "fp16") if cuda else "fp32"
    if compute == "fp16" and not cuda:
        raise ValueError("fp16 autocast with loss scaling needs a GPU; use --precision bf16 or fp32 on CPU")
    frozen = strategy_named(strategy).frozen_dtype(compute)
    return Precision(compute=compute, frozen=frozen, device="cuda" if cuda else "cpu", strategy=strategy)


def apply(model: nn.Module, policy: Precision) -> dict[str, int]:
    """Cast trainable parameters to fp32 and frozen weight matrices to ``policy.frozen``; returns counts per dtype.

    Frozen 1-D parameters (norm weights, biases, layer scales: a negligible share) stay fp32, so
    normalisations see fp32 weights whatever dtype their input has. Nothing is cast where the strategy's
    engine casts the weights itself (ZeRO-3).
    """
    counts: dict[str, int] = {}
    engine_casts = strategy_named(policy.strategy).engine_casts_weights
    for p in model.parameters():
        dtype = p.dtype if engine_casts else (
            torch.float32 if p.requires_grad or p.ndim < 2 else DTYPES[policy.frozen])
        if p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)
        counts[str(p.dtype).removeprefix("torch.")] = counts.get(str(p.dtype).removeprefix("torch."), 0) + p.numel()
    return counts
