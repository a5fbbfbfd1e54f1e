"""Memory plan for stage-2 training: per-GPU bytes of weights, gradients, optimizer and activations.

Parameter counts are exact (the model is built on the meta device from its config; no weights are
read). Activations are counted tensor by tensor from what autograd saves for backward in one IAS-ViT
layer and one decoder layer (measured facts: a frozen Linear saves no input, LayerNorm / RMSNorm save
their input, SDPA saves q, k, v, its output and the log-sum-exp; under autocast every Linear saves its
own cast copy of its input; under DDP the residual stream stays fp32 because trainable weights and norms
are fp32, while FSDP (gathering every parameter in the compute dtype) and ZeRO-3 (bf16 weights) run
whole layers, norms and embeddings included, in bf16: a bf16 residual stream and no cast copies). With
gradient checkpointing a layer keeps only its input, and one layer at a time is recomputed. Logits
exist only for labelled (critique) positions (model.py). Tests check the totals against the peak
memory of real CPU training steps (fp32, and bf16 under each strategy on 2 ranks). Both base families: InternVL (tiles of 448 px) and Qwen2.5-VL (one
native-resolution image of up to ``max_pixels``; window attention, RMSNorm, SwiGLU and rope in its blocks).

Per-GPU weights, gradients, optimizer states and engine buffers are each strategy's own formula
(sharding.py); activations and the backward peak are counted here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stages import families
from stages.families.shapes import Shapes
from stages.finetune import sharding
from stages.finetune.sharding import DTYPE_BYTES

GiB = 1024**3
DEFAULT_TEXT_TOKENS = 256  # prompt + critique when the data is not at hand (PCCD critiques: ~50-200 tokens)
ALLOCATOR_RESERVE = 0.08  # of GPU memory: CUDA context, allocator fragmentation, NCCL buffers


def load_model_config(base: str | Path, fusion: str = "cross_attention") -> Any:
    """``base``: a registered name (either family), a checkpoint dir or its config.json (weights are never read)."""
    from transformers import AutoConfig

    named = families.of_name(str(base))
    if named is not None:
        if str(base) in named.named_names():
            return named.named_config(str(base), fusion)
        return named.tiny_config(str(base), 2048, fusion)
    path = Path(base)
    if not path.exists():
        known = ", ".join(n for f in families.FAMILIES.values() for n in [*f.named_names(), *f.tiny_names()])
        raise FileNotFoundError(f"{base}: neither a registered config ({known}) nor a checkpoint dir / config.json")
    family = families.of_base(path)
    family.model_class()  # imports the family's model module, which registers its IAS config type with AutoConfig
    config = AutoConfig.from_pretrained(path.parent if path.is_file() else path)
    return family.ias_config(config, fusion)


# ---------------------------------------------------------------- the setting


@dataclass(frozen=True)
class Setting:
    """What is trained and how: everything the memory depends on besides the shapes."""

    max_tiles: int = 12
    max_pixels: int | None = None  # Qwen2.5-VL family: pixels per image (None: DEFAULT_QWEN_PIXELS)
    per_device: int = 1
    gpus: int = 1
    strategy: str = "ddp"
    gradient_checkpointing: bool = True
    trainable: tuple[str, ...] = ("cross_attention", "projector", "llm")
    lora: bool = False
    lora_r: int = 16
    text_tokens: int = DEFAULT_TEXT_TOKENS  # prompt + critique + eos per sample
    labelled_tokens: int | None = None  # tokens with a loss per sample (default: text_tokens - 32 prompt tokens)
    compute: str = "bf16"  # autocast dtype ("fp32" on CPU)
    accumulation: int = 1  # gradient accumulation steps (grads stay resident across micro-batches)


@dataclass
class Counts:
    total: int
    trainable: int
    by_part: dict[str, int]
    largest_layer: int  # parameters of the largest wrapped layer
    persistent: int  # parameters in tensors under ZeRO-3's persistence threshold
    llm_layer_trainable: int = 0  # trainable parameters of one decoder layer
    vision_layer_trainable: int = 0  # of one IAS-ViT layer (its cross-attention when the ViT base is frozen)
    head: int = 0  # the output embedding (lm_head)
    head_trainable: int = 0
    root: int = 0  # parameters outside the wrapped layers (embeddings, projector, lm_head, norms): FSDP's root group
    root_trainable: int = 0


def count_parameters(config: Any, setting: Setting, persistence_threshold: float = 1e7) -> Counts:
    """Exact parameter counts from the config (meta device)."""
    from stages.finetune.parts import LORA_TARGETS, part_of

    model = families.meta_model(config)
    by_part: dict[str, int] = {}
    trainable = total = persistent = 0
    lora_parts = set(setting.trainable) - {"llm"} if setting.lora else set(setting.trainable)
    for name, p in model.named_parameters():
        part = part_of(name) or "other"
        by_part[part] = by_part.get(part, 0) + p.numel()
        total += p.numel()
        trainable += p.numel() if part in lora_parts else 0
        persistent += p.numel() if p.numel() < persistence_threshold else 0
    if setting.lora:
        pattern = re.compile(LORA_TARGETS)
        lora = sum(setting.lora_r * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and pattern.fullmatch(f"model.{n}" if not n.startswith("model.") else n))
        by_part["lora"] = lora
        total += lora
        trainable += lora
    vision_layers, llm_layers = families.of_config(config).layers(model)
    layers = [*vision_layers, *llm_layers]
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    prefix = {id(m): n for n, m in model.named_modules()}

    def layer_trainable(layer: torch.nn.Module) -> int:
        return sum(p.numel() for n, p in layer.named_parameters()
                   if (part_of(f"{prefix[id(layer)]}.{n}") or "") in lora_parts)

    llm_layer = layer_trainable(llm_layers[0])
    if setting.lora and layers:
        llm_layer += by_part["lora"] // config.text_config.num_hidden_layers
    vision_layer = layer_trainable(vision_layers[0])
    head = model.get_output_embeddings().weight.numel()
    head_trainable = head if "llm" in lora_parts else 0
    in_layers = sum(p.numel() for layer in layers for p in layer.parameters())
    layers_trainable = len(llm_layers) * llm_layer + len(vision_layers) * vision_layer
    return Counts(total, trainable, by_part, largest, persistent, llm_layer, vision_layer, head, head_trainable,
                  total - in_layers, trainable - layers_trainable)


# ---------------------------------------------------------------- activations


def _llm_layer_bytes(s: Shapes, a: int, r: int, cast: bool, kv_saved: int, trainable: bool) -> int:
    """Bytes autograd keeps per LLM token for one decoder layer (residual stream of ``r`` bytes, RMSNorm in fp32)."""
    h = s.h
    n = 2 * (4 * h + r * h)  # the two RMSNorms: fp32 input and normalised input
    n += a * h + 2 * a * kv_saved + a * h  # SDPA q, k, v, out
    if trainable:  # Linear inputs (cast copies each, or the shared norm outputs), o_proj input, SwiGLU
        n += (3 * a * h if cast else r * h) + a * h + (2 * a * h if cast else r * h) + 4 * a * s.mlp
    else:  # frozen Linears keep nothing; SiLU and the gate product still do
        n += 3 * a * s.mlp
    return n


@dataclass
class Activations:
    vision_layer: int  # what one layer keeps for backward, one sample
    llm_layer: int
    total: int  # one sample, all layers (with or without checkpointing)
    peak_extra: int  # recomputed layer + backward working set, one sample
    vision_layers: int = 0
    llm_layers: int = 0


def activation_bytes(config: Any, setting: Setting, counts: Counts) -> Activations:
    family = families.of_config(config)
    s = family.plan_shapes(config, setting)
    a = DTYPE_BYTES[setting.compute]
    # FSDP gathers every parameter (norms and embeddings too) in the compute dtype and ZeRO-3 stores them in it:
    # the residual stream is in the compute dtype and Linear inputs need no cast copy. DDP keeps fp32 trainable
    # weights and norms: an fp32 residual stream, autocast casting each Linear input.
    pure = a != 4 and sharding.strategy(setting.strategy).layers_in_compute_dtype
    r, cast = (a if pure else 4), a != 4 and not pure
    parts = set(setting.trainable)
    cross = config.ias_fusion == "cross_attention" and "cross_attention" in parts
    vision_grad = cross or "vision" in parts
    vtok = s.tiles * s.vision_tokens  # vision tokens per sample
    vision_layer = family.vision_layer_bytes(s, a, r, cast, "vision" in parts, cross) * vtok if vision_grad else 0
    kv_saved = s.h if setting.per_device > 1 else s.kv  # padded batches repeat k/v (no GQA kernel with a mask)
    llm_trainable = "llm" in parts or setting.lora
    llm_layer = _llm_layer_bytes(s, a, r, cast, kv_saved, llm_trainable) * s.seq
    # outside the layers: model inputs, saliency tokens, projector, final norm, label-only logits
    tiles_in = s.pixel_bytes
    projector = s.image_tokens * (2 * 4 * 4 * s.d + a * s.projector_hidden) if "projector" in parts or vision_grad else 0
    logits = s.labelled * (a + 4 + 4) * s.vocab + s.labelled * a * s.h
    fixed = tiles_in + (vtok * a * s.d if cross else 0) + projector + 2 * r * s.h * s.seq + logits
    mask = s.seq * s.seq if setting.per_device > 1 else 0
    working = 3 * r * max(s.h * s.seq, s.d * vtok)  # activation gradients in flight
    if setting.gradient_checkpointing:  # a layer keeps its input; one layer at a time is recomputed
        llm_kept, vision_kept = r * s.h * s.seq, (r * s.d * vtok if vision_grad else 0)
        peak_extra = max(vision_layer, llm_layer) + working
    else:
        llm_kept, vision_kept = llm_layer, vision_layer
        peak_extra = working
    total = s.layers * llm_kept + s.vision_layers * vision_kept + fixed + mask
    return Activations(vision_kept, llm_kept, total, peak_extra, s.vision_layers, s.layers)


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    config_name: str
    setting: Setting
    counts: Counts
    seq: int
    weights: float  # bytes per GPU
    gradients: float
    optimizer: float
    buffers: float  # sharding engines' gathered layers / buckets, DDP buckets
    activations: float  # per-device batch, incl. the recomputed layer and the backward working set
    peak_live: float  # activations + gradients at their joint peak (backward frees one as the other grows)
    activations_per_sample: float
    activations_other: float  # the same sample with the other checkpointing choice
    gpu_memory: float | None = None  # bytes
    max_batch: int | None = None
    notes: list[str] = field(default_factory=list)
    images: str = ""  # the image side of the setting: "40 tiles", "1.00 MP images"

    @property
    def total(self) -> float:
        return self.weights + self.optimizer + self.buffers + self.peak_live

    def line(self) -> str:
        def gb(x: float) -> str:
            return f"{x / GiB:.1f}" if x >= GiB / 10 else f"{x / GiB:.4f}"

        st = self.setting
        fit = ""
        if self.gpu_memory:
            fit = (f" of {self.gpu_memory / GiB:.0f} GB; largest per-device batch that fits: {self.max_batch}"
                   if self.max_batch else f" of {self.gpu_memory / GiB:.0f} GB: does NOT fit even at per-device batch 1")
        return (f"plan: {st.strategy} x{st.gpus}, {self.images} ({self.seq} tokens/sample), per-device batch "
                f"{st.per_device}, checkpointing {'on' if st.gradient_checkpointing else 'off'}: per GPU "
                f"{gb(self.total)} GB (weights {gb(self.weights)}, grads {gb(self.gradients)}, optimizer "
                f"{gb(self.optimizer)}, buffers {gb(self.buffers)}, activations {gb(self.activations)}; "
                f"grads and activations overlap){fit}")

    def table(self) -> str:
        st, c = self.setting, self.counts
        on, off = ((self.activations_per_sample, self.activations_other) if st.gradient_checkpointing
                   else (self.activations_other, self.activations_per_sample))
        rows = [
            ("model", f"{self.config_name}: {c.total / 1e9:.2f} B parameters, {c.trainable / 1e9:.3f} B trainable "
                      f"({', '.join(f'{k} {v / 1e6:.1f} M' for k, v in c.by_part.items())})"),
            ("setting", f"{st.strategy} on {st.gpus} GPU(s), per-device batch {st.per_device}, {self.images} "
                        f"-> {self.seq} LLM tokens/sample, compute {st.compute}, LoRA {'on' if st.lora else 'off'}"),
            ("weights", f"{self.weights / GiB:8.2f} GB"),
            ("gradients", f"{self.gradients / GiB:8.2f} GB"),
            ("optimizer (AdamW)", f"{self.optimizer / GiB:8.2f} GB"),
            ("engine buffers", f"{self.buffers / GiB:8.2f} GB"),
            ("activations / sample", f"{on / GiB:8.2f} GB with checkpointing, {off / GiB:.2f} GB without"),
            (f"activations x {st.per_device}", f"{self.activations / GiB:8.2f} GB "
                                               f"(checkpointing {'on' if st.gradient_checkpointing else 'off'})"),
            ("total per GPU", f"{self.total / GiB:8.2f} GB (gradients and activations overlap in backward)"),
        ]
        if self.gpu_memory:
            rows.append(("fits", f"largest per-device batch in {self.gpu_memory / GiB:.0f} GB "
                                 f"({ALLOCATOR_RESERVE:.0%} reserved): {self.max_batch or 'none (0)'}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows + [("note", n) for n in self.notes])


def _backward_peak(counts: Counts, setting: Setting, acts: Activations, grads: float) -> float:
    """Peak of activations + gradients over one step: backward frees each layer's activations as its
    gradients appear (LLM top-down, then the vision tower); with accumulation the gradients stay. The strategy's
    backward buffers (sharding.Strategy.backward_bytes) ride on top: some from the start of backward, some while a
    layer is reduced, some at its end."""
    engine = sharding.strategy(setting.strategy)
    b, g = setting.per_device, setting.gpus if engine.shards_state else 1
    held, transient, end = engine.backward_bytes(counts, setting)
    if setting.accumulation > 1:
        return max(grads + b * acts.total + acts.peak_extra + held + transient, grads + end)
    live = b * acts.total + held
    layer_grads = 4 * (acts.llm_layers * counts.llm_layer_trainable + acts.vision_layers * counts.vision_layer_trainable) / g
    live += grads - layer_grads  # lm_head, embeddings, projector: counted up front
    peak = live + transient
    for layers, kept, trainable in ((acts.llm_layers, acts.llm_layer, counts.llm_layer_trainable),
                                    (acts.vision_layers, acts.vision_layer, counts.vision_layer_trainable)):
        for _ in range(layers):
            live += 4 * trainable / g - b * kept
            peak = max(peak, live + transient)
    return max(peak + acts.peak_extra, live - held + end, grads)


def plan(config: Any, setting: Setting, gpu_memory_gb: float | None = None, name: str = "") -> Plan:
    """Per-GPU memory of ``setting`` on ``config``; with ``gpu_memory_gb`` also the largest batch that fits."""
    counts = count_parameters(config, setting)
    weights, grads, optim, buffers = sharding.strategy(setting.strategy).state_bytes(counts, setting)
    acts = activation_bytes(config, setting, counts)
    other = activation_bytes(config, Setting(**{**setting.__dict__,
                                                "gradient_checkpointing": not setting.gradient_checkpointing}), counts)
    per_sample = acts.total
    activations = setting.per_device * per_sample + acts.peak_extra
    peak_live = _backward_peak(counts, setting, acts, grads)
    shapes = families.of_config(config).plan_shapes(config, setting)
    result = Plan(name or "model", setting, counts, shapes.seq, weights, grads, optim, buffers, activations, peak_live,
                  per_sample, other.total, images=shapes.images)
    if gpu_memory_gb:
        result.gpu_memory = gpu_memory_gb * GiB
        budget = result.gpu_memory * (1 - ALLOCATOR_RESERVE)
        result.max_batch = 0
        while result.max_batch < 4096 and weights + optim + buffers + _backward_peak(
                counts, Setting(**{**setting.__dict__, "per_device": result.max_batch + 1}), acts, grads) <= budget:
            result.max_batch += 1
    return result


def training_flops(config: Any, setting: Setting) -> float:
    """Model FLOPs of one training example (matmuls, forward + backward; recomputation not counted).

    Trainable matmuls cost 3x their forward (input and weight gradients), frozen ones that gradients
    pass through 2x; attention scores and values count 2 x 2 x n^2 x d per layer (causal: half).
    """
    s = families.of_config(config).plan_shapes(config, setting)
    parts = set(setting.trainable)
    cross = config.ias_fusion == "cross_attention"
    n, span = s.vision_tokens, s.attention_span
    vit = 2 * n * (4 * s.d * s.d + s.vision_mlp_matrices * s.d * s.vision_mlp) + 4 * n * span * s.d
    xattn = (2 * n * 4 * s.d * s.d + 4 * n * span * s.d) if cross else 0
    vision_grad = (cross and "cross_attention" in parts) or "vision" in parts
    vision = s.tiles * s.vision_layers * (vit * (3 if "vision" in parts else 2 if vision_grad else 1)
                                          + xattn * (3 if "cross_attention" in parts else 2))
    projector = 3 * 2 * s.image_tokens * s.projector_macs
    llm_token = 2 * (2 * s.h * s.h + 2 * s.h * s.kv + 3 * s.h * s.mlp) + 2 * s.seq * s.h
    llm = s.layers * s.seq * llm_token * (3 if "llm" in parts and not setting.lora else 2)
    head = 3 * 2 * s.labelled * s.h * s.vocab
    return float(vision + projector + llm + head)
