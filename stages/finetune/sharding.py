"""Multi-GPU strategies for stage 2: ``ddp`` (replicated), ``fsdp`` (FSDP2) and ``zero3`` (DeepSpeed).

All three run through the HF Trainer under ``torchrun``; the two sharded ones read their settings
from ``configs/fsdp.yaml`` and ``configs/zero3.yaml``. FSDP wraps the vision layer (IAS-ViT layer or
Qwen2.5-VL vision block, its saliency cross-attention inside it) and the LLM's decoder layer.
accelerate only turns FSDP on for GPU processes and transformers only starts DeepSpeed's process
group on GPUs, so on CPU (gloo: the
test suite's 2-process runs) :func:`enable_fsdp_on_cpu` and :func:`init_deepspeed_on_cpu` do
those two steps themselves; everything else is the libraries' own sharded path.

FSDP choices for full fine-tuning (see :func:`fsdp_mixed_precision`): layers are gathered in the compute
dtype (bf16 / fp16, so the whole layer, norms and embeddings included, runs in it), gradients are
reduce-scattered in fp32 and reduced on every micro-batch (``sync_each_batch``): without it FSDP2 keeps
every layer's full unsharded gradient (in the reduce dtype) on every GPU until the last micro-batch of
an accumulation step. With ``cpu_ram_efficient_loading`` (configs/fsdp.yaml) only rank 0 holds the
weights in host memory; the other ranks build the model's parameters on the meta device
(:func:`builds_on_meta`) and receive their shards from rank 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

STRATEGIES = ("ddp", "fsdp", "zero3")
CONFIG_DIR = Path(__file__).with_name("configs")


def load_strategy_config(strategy: str) -> dict[str, Any]:
    """The strategy's YAML config as a dict (``ddp`` has none)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "ddp":
        return {}
    return yaml.safe_load((CONFIG_DIR / f"{strategy}.yaml").read_text())


def wrap_classes(config: Any) -> list[str]:
    """Class names of the vision layer (IAS-ViT layer, Qwen2.5-VL vision block) and the LLM decoder layer of
    ``config`` (built on the meta device)."""
    from stages import families
    from stages.finetune.plan import meta_model

    vision, llm = families.of_config(config).layers(meta_model(config))
    return [type(vision[0]).__name__, type(llm[0]).__name__]


def training_kwargs(strategy: str, config: Any, gradient_checkpointing: bool) -> dict[str, Any]:
    """TrainingArguments entries for ``strategy`` (FSDP / DeepSpeed settings and checkpointing switches)."""
    settings = load_strategy_config(strategy)
    checkpointing = {"activation_checkpointing": gradient_checkpointing,
                     "activation_checkpointing_kwargs": {"use_reentrant": False}}
    if strategy == "ddp":
        return checkpointing
    if strategy == "fsdp":
        # the model's own non-reentrant checkpointing: FSDP's checkpoint wrapper on top of transformers'
        # checkpointing layers recomputes decoder layers with wrong shapes here (measured, transformers 5.24)
        settings = {**settings, "transformer_layer_cls_to_wrap": wrap_classes(config), "activation_checkpointing": False}
        sync = {"gradient_accumulation_kwargs": {"sync_each_batch": True}}  # reduce-scatter every micro-batch
        return {"fsdp": True, "fsdp_config": settings, "accelerator_config": sync, **checkpointing}
    return {"deepspeed": settings, **checkpointing}


def enable_fsdp_on_cpu(trainer: Any) -> None:
    """Switch a CPU (gloo) Trainer's accelerator to FSDP, which accelerate enables on GPUs only.

    Both the accelerator state and the process state are set: accelerate re-reads the latter
    whenever a fresh ``AcceleratorState()`` is made (e.g. when saving a checkpoint).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if trainer.args.fsdp_plugin_args is None or trainer.is_fsdp_enabled or torch.cuda.is_available():
        return
    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":  # what accelerate does on GPUs (gather and reduce in the compute dtype)
        state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def fsdp_mixed_precision(trainer: Any) -> None:
    """Gather parameters in the compute dtype but reduce-scatter gradients in fp32 (accelerate reduces in the
    compute dtype: bf16 sums of 8 ranks' gradients lose their low bits). Set before the model is wrapped."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or not trainer.is_fsdp_enabled:
        return
    compute = torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else None
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def builds_on_meta(args: Any) -> bool:
    """Whether this process builds the model without weights: FSDP with ``cpu_ram_efficient_loading`` on a rank
    other than 0 (rank 0 alone loads them and sends each rank its shards when the Trainer wraps the model)."""
    settings = args.fsdp_config or {}
    return bool(args.fsdp) and args.process_index > 0 and str(settings.get("cpu_ram_efficient_loading")).lower() == "true"


def init_deepspeed_on_cpu() -> None:
    """Start DeepSpeed's communication on the existing gloo group (on GPUs the Trainer does it)."""
    if torch.cuda.is_available():
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
