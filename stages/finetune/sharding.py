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

CONFIG_DIR = Path(__file__).with_name("configs")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class Strategy:
    """What one strategy decides: where each state lives, its Trainer settings and its per-GPU memory.

    ``counts`` (plan.Counts) are the model's exact parameter counts and ``setting`` (plan.Setting) the run;
    a new strategy is one subclass here and one entry in ``STRATEGY_CLASSES``.
    """

    name = ""
    shards_state = False  # weights, gradients and optimizer states divided over the GPUs
    layers_in_compute_dtype = False  # every parameter of a running layer (norms too) is in the compute dtype
    engine_casts_weights = False  # the engine casts and partitions the weights itself (no precision.apply)
    fused_adamw = True  # torch's fused AdamW on GPUs works with this strategy's parameters

    def config(self) -> dict[str, Any]:
        """The strategy's YAML settings (configs/NAME.yaml), {} when it has none."""
        file = CONFIG_DIR / f"{self.name}.yaml"
        return yaml.safe_load(file.read_text()) if file.exists() else {}

    def frozen_dtype(self, compute: str) -> str:
        """Storage dtype of frozen weight matrices when computing in ``compute``."""
        return compute

    def prepare(self) -> None:
        """Anything that must happen before the model is built."""

    def training_kwargs(self, config: Any, gradient_checkpointing: bool) -> dict[str, Any]:
        """TrainingArguments entries (FSDP / DeepSpeed settings and checkpointing switches)."""
        return {"activation_checkpointing": gradient_checkpointing,
                "activation_checkpointing_kwargs": {"use_reentrant": False}}

    def state_bytes(self, counts: Any, setting: Any) -> tuple[float, float, float, float]:
        """(weights, gradients, optimizer, engine buffers) per GPU."""
        raise NotImplementedError

    def backward_bytes(self, counts: Any, setting: Any) -> tuple[float, float, float]:
        """What the engine adds during backward, per GPU: (held from its start to its end, transient while one
        wrapped layer's gradients are reduced, held at its end when the activations are gone)."""
        return 0.0, 0.0, 0.0


class DDP(Strategy):
    """Replicated: weights T*4 + (P-T)*frozen bytes; grads T*4 (+ T*4 DDP buckets when G > 1); AdamW T*8."""

    name = "ddp"

    def state_bytes(self, counts: Any, setting: Any) -> tuple[float, float, float, float]:
        p, t, g = counts.total, counts.trainable, setting.gpus
        frozen = DTYPE_BYTES[self.frozen_dtype(setting.compute)]
        return 4 * t + frozen * (p - t), 4 * t, 8 * t, 4 * t if g > 1 else 0


class FSDP(Strategy):
    """FSDP2: (P*4 + T*4 + T*8) / G, plus two gathered layers and the root group gathered in the compute dtype.
    The root group is everything outside the wrapped layers (embeddings, projector, lm_head, final norms):
    FSDP2 keeps it gathered from forward to the end of backward, with its unsharded gradients (lm_head's from
    the start of backward) and, at the end, their fp32 reduce-scatter input. Each wrapped layer's unsharded
    gradients and their fp32 reduce input exist while that layer is reduced (every micro-batch: only the sharded
    fp32 gradients stay across accumulation steps)."""

    name = "fsdp"
    shards_state = True
    layers_in_compute_dtype = True  # gathered in the compute dtype, norms and embeddings included
    fused_adamw = False  # not over DTensor shards

    def frozen_dtype(self, compute: str) -> str:
        return "fp32"  # one dtype per sharded group; FSDP2 casts a gathered layer itself

    def training_kwargs(self, config: Any, gradient_checkpointing: bool) -> dict[str, Any]:
        # the model's own non-reentrant checkpointing: FSDP's checkpoint wrapper on top of transformers'
        # checkpointing layers recomputes decoder layers with wrong shapes here (measured, transformers 5.24)
        settings = {**self.config(), "transformer_layer_cls_to_wrap": wrap_classes(config),
                    "activation_checkpointing": False}
        sync = {"gradient_accumulation_kwargs": {"sync_each_batch": True}}  # reduce-scatter every micro-batch
        return {"fsdp": True, "fsdp_config": settings, "accelerator_config": sync,
                **super().training_kwargs(config, gradient_checkpointing)}

    def state_bytes(self, counts: Any, setting: Any) -> tuple[float, float, float, float]:
        p, t, g, a = counts.total, counts.trainable, setting.gpus, DTYPE_BYTES[setting.compute]
        return 4 * p / g, 4 * t / g, 8 * t / g, a * (2 * counts.largest_layer + counts.root)

    def backward_bytes(self, counts: Any, setting: Any) -> tuple[float, float, float]:
        a = DTYPE_BYTES[setting.compute]
        layer = max(counts.llm_layer_trainable, counts.vision_layer_trainable)
        return a * counts.head_trainable, (a + 4) * layer, (a + 4) * counts.root_trainable


class ZeRO3(Strategy):
    """DeepSpeed ZeRO-3: (P*2 + T*4 master + T*(2+4) + T*8) / G, parameters under the persistence threshold
    replicated, plus the reduce bucket and the live-parameter budget of configs/zero3.yaml. Gradients: the bf16
    partition it accumulates into and, at the optimizer step, its fp32 copy. DeepSpeed's own mixed precision:
    with bf16 on, every weight, trainable and frozen, is held in bf16 (precision.py)."""

    name = "zero3"
    shards_state = True
    layers_in_compute_dtype = True
    engine_casts_weights = True

    def prepare(self) -> None:
        init_deepspeed_on_cpu()  # ZeRO-3 partitions the model as it is built

    def training_kwargs(self, config: Any, gradient_checkpointing: bool) -> dict[str, Any]:
        return {"deepspeed": self.config(), **super().training_kwargs(config, gradient_checkpointing)}

    def state_bytes(self, counts: Any, setting: Any) -> tuple[float, float, float, float]:
        p, t, g, a = counts.total, counts.trainable, setting.gpus, DTYPE_BYTES[setting.compute]
        live = min(1e9, p) * a  # stage3_max_live_parameters
        bucket = min(1e9, t) * a  # reduce_bucket_size
        return a * (p - counts.persistent) / g + a * counts.persistent + 4 * t / g, (a + 4) * t / g, 8 * t / g, live + bucket


STRATEGY_CLASSES: dict[str, type[Strategy]] = {cls.name: cls for cls in (DDP, FSDP, ZeRO3)}
STRATEGIES = tuple(STRATEGY_CLASSES)


def strategy(name: str) -> Strategy:
    """The strategy called ``name``."""
    if name not in STRATEGY_CLASSES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    return STRATEGY_CLASSES[name]()


def wrap_classes(config: Any) -> list[str]:
    """Class names of the vision layer (IAS-ViT layer, Qwen2.5-VL vision block) and the LLM decoder layer of
    ``config`` (built on the meta device)."""
    from stages import families

    vision, llm = families.of_config(config).layers(families.meta_model(config))
    return [type(vision[0]).__name__, type(llm[0]).__name__]


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
    compute dtype: bf16 sums of 8 ranks' gradients lose their low bits). Set before the model is wrapped.

    Forward inputs are not cast (``cast_forward_inputs`` off): the root's cast would turn the raw saliency maps
    into bf16 before their min-max normalisation. Nothing needs it: tiles arrive as uint8 and are normalised into
    the gathered weights' dtype, and every wrapped layer's inputs come out of gathered (compute-dtype) layers."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or not trainer.is_fsdp_enabled:
        return
    compute = torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else None
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32,
                                                         cast_forward_inputs=False)


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
