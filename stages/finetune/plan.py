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

Per GPU, by strategy (P = parameters, T = trainable, G = GPUs):
- ddp:   weights T*4 + (P-T)*frozen bytes; grads T*4 (+ T*4 DDP buckets when G > 1); AdamW T*8
- fsdp:  (P*4 + T*4 + T*8) / G, plus two gathered layers and the output embedding in the compute dtype and
         one group's unsharded gradients + fp32 reduce-scatter input (gradients are reduced on every
         micro-batch, so only the sharded fp32 gradients stay across accumulation steps)
- zero3: (P*2 + T*4 master + T*4 + T*8) / G, parameters under the persistence threshold replicated,
         plus the reduce bucket and the live-parameter budget of configs/zero3.yaml
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

GiB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DEFAULT_TEXT_TOKENS = 256  # prompt + critique when the data is not at hand (PCCD critiques: ~50-200 tokens)
ALLOCATOR_RESERVE = 0.08  # of GPU memory: CUDA context, allocator fragmentation, NCCL buffers
DEFAULT_QWEN_PIXELS = 28 * 28 * 1280  # the Qwen2.5-VL image processor's default budget (1,280 LLM tokens)


def load_model_config(base: str | Path, fusion: str = "cross_attention") -> Any:
    """``base``: a registered name (either family), a checkpoint dir or its config.json (weights are never read)."""
    from transformers import AutoConfig

    from stages import families

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
    head: int = 0  # the output embedding (lm_head): an FSDP group of its own, kept gathered from forward to backward
    head_trainable: int = 0


def meta_model(config: Any) -> Any:
    """The model of ``config`` on the meta device (no memory, no weights). Outside ZeRO-3's ``zero.Init``,
    which transformers would otherwise enter (a collective) once a ZeRO-3 TrainingArguments exists."""
    from transformers.integrations import deepspeed as hf_deepspeed

    from stages import families

    saved, hf_deepspeed._hf_deepspeed_config_weak_ref = hf_deepspeed._hf_deepspeed_config_weak_ref, None
    try:
        with torch.device("meta"):
            return families.of_config(config).model_class()(config)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def count_parameters(config: Any, setting: Setting, persistence_threshold: float = 1e7) -> Counts:
    """Exact parameter counts from the config (meta device)."""
    from stages import families
    from stages.finetune.parts import LORA_TARGETS, part_of

    model = meta_model(config)
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
    return Counts(total, trainable, by_part, largest, persistent, llm_layer, vision_layer, head, head_trainable)


# ---------------------------------------------------------------- activations


@dataclass(frozen=True)
class Shapes:
    tiles: int  # per sample, thumbnail included
    vision_tokens: int  # per tile (patches + CLS)
    d: int
    vision_mlp: int
    vision_layers: int
    image_tokens: int  # LLM tokens per sample from the image
    seq: int  # LLM tokens per sample
    labelled: int  # positions with a loss per sample
    h: int
    kv: int  # key/value width
    mlp: int
    layers: int
    vocab: int
    qwen: bool = False  # Qwen2.5-VL family: one native-resolution image, windowed RMSNorm / SwiGLU / rope blocks
    pixel_bytes: int = 0  # model inputs per sample: pixels (+ saliency tiles for InternVL), fp32
    window: int = 0  # Qwen2.5-VL: patches per attention window (window blocks)
    full_layers: int = 0  # Qwen2.5-VL: blocks with full attention

    @staticmethod
    def of(config: Any, setting: Setting) -> Shapes:
        from stages.families.internvl.model import tokens_per_tile

        v, t = config.vision_config, config.text_config
        labelled = setting.labelled_tokens if setting.labelled_tokens is not None else max(1, setting.text_tokens - 32)
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        text = dict(labelled=labelled, h=t.hidden_size, kv=t.num_key_value_heads * head_dim, mlp=t.intermediate_size,
                    layers=t.num_hidden_layers, vocab=t.vocab_size)
        if config.model_type == "ias_qwen2_5_vl":  # the largest image the pixel budget lets through
            side = v.patch_size * v.spatial_merge_size
            patches = (setting.max_pixels or DEFAULT_QWEN_PIXELS) // side**2 * v.spatial_merge_size**2
            image_tokens = patches // v.spatial_merge_size**2
            return Shapes(tiles=1, vision_tokens=patches, d=v.hidden_size, vision_mlp=v.intermediate_size,
                          vision_layers=v.depth, image_tokens=image_tokens, seq=image_tokens + setting.text_tokens,
                          qwen=True, pixel_bytes=patches * v.in_channels * v.temporal_patch_size * v.patch_size**2 * 4,
                          window=min(patches, (v.window_size // v.patch_size) ** 2),
                          full_layers=len(v.fullatt_block_indexes), **text)
        tiles = setting.max_tiles + (1 if setting.max_tiles > 1 else 0)
        grid = v.image_size[0] // v.patch_size[0]
        image_tokens = tiles * tokens_per_tile(config)
        return Shapes(tiles=tiles, vision_tokens=grid * grid + 1, d=v.hidden_size, vision_mlp=v.intermediate_size,
                      vision_layers=v.num_hidden_layers, image_tokens=image_tokens,
                      seq=image_tokens + setting.text_tokens, pixel_bytes=tiles * 4 * v.image_size[0] ** 2 * 4, **text)

    def images(self, setting: Setting) -> str:
        """The image side of a setting, for people."""
        if self.qwen:
            return f"{(setting.max_pixels or DEFAULT_QWEN_PIXELS) / 1e6:.2f} MP images"
        return f"{setting.max_tiles} tiles"


def _vision_layer_bytes(s: Shapes, a: int, r: int, cast: bool, trainable_vit: bool, cross: bool) -> int:
    """Bytes autograd keeps per vision token for one IAS-ViT layer (residual stream of ``r`` bytes; ``cast``:
    autocast keeps a compute-dtype copy of each fp32 Linear input)."""
    d = s.d
    n = r * d + 4 * a * d  # layernorm_before input; SDPA q, k, v, out
    n += r * d + a * s.vision_mlp  # layernorm_after input; GELU input
    if trainable_vit:  # the layer's own Linears and layer-scale products keep their inputs
        n += (3 * a * d if cast else r * d) + a * d + (a * d if cast else r * d) + a * s.vision_mlp + 2 * a * d
    if cross:  # norm_context input, q/k/v inputs, SDPA, o_proj input, gate product
        n += r * d + (a * d if cast else r * d) + (2 * a * d if cast else r * d) + 4 * a * d + a * d + a * d
    return n


def _qwen_vision_layer_bytes(s: Shapes, a: int, r: int, cast: bool, trainable_vit: bool, cross: bool) -> int:
    """Bytes autograd keeps per patch for one Qwen2.5-VL vision block (+ IAS) (residual stream fp32).

    RMSNorm keeps its input and the normalised input; the vision rope keeps fp32 q, k and their rotated
    halves; SwiGLU keeps the gate and up outputs and the SiLU output."""
    d = s.d
    n = 2 * r * d + 4 * r * d + 4 * a * d  # norm1; rope on q and k; SDPA q, k, v, out
    n += 2 * r * d + 3 * a * s.vision_mlp  # norm2; SwiGLU
    if trainable_vit:  # qkv, proj, gate / up (one input) and down inputs
        n += (a * d if cast else r * d) + a * d + (a * d if cast else r * d) + a * s.vision_mlp
    if cross:  # norm_query (normalised), norm_context, q / k,v inputs, rope, SDPA, o_proj input, gate product
        n += r * d + 2 * r * d + (a * d if cast else r * d) + (2 * a * d if cast else r * d) + 4 * r * d + 4 * a * d
        n += 2 * a * d
    return n


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
    s = Shapes.of(config, setting)
    a = DTYPE_BYTES[setting.compute]
    # FSDP gathers every parameter (norms and embeddings too) in the compute dtype and ZeRO-3 stores them in it:
    # the residual stream is in the compute dtype and Linear inputs need no cast copy. DDP keeps fp32 trainable
    # weights and norms: an fp32 residual stream, autocast casting each Linear input.
    pure = a != 4 and setting.strategy in ("fsdp", "zero3")
    r, cast = (a if pure else 4), a != 4 and not pure
    parts = set(setting.trainable)
    cross = config.ias_fusion == "cross_attention" and "cross_attention" in parts
    vision_grad = cross or "vision" in parts
    vtok = s.tiles * s.vision_tokens  # vision tokens per sample
    layer_bytes = _qwen_vision_layer_bytes if s.qwen else _vision_layer_bytes
    vision_layer = layer_bytes(s, a, r, cast, "vision" in parts, cross) * vtok if vision_grad else 0
    kv_saved = s.h if setting.per_device > 1 else s.kv  # padded batches repeat k/v (no GQA kernel with a mask)
    llm_trainable = "llm" in parts or setting.lora
    llm_layer = _llm_layer_bytes(s, a, r, cast, kv_saved, llm_trainable) * s.seq
    # outside the layers: model inputs, saliency tokens, projector, final norm, label-only logits
    tiles_in = s.pixel_bytes
    merged = 3 * a * 4 * s.d if s.qwen else 2 * a * s.h  # Qwen2.5-VL's merger MLP is 4d -> 4d -> h wide
    projector = s.image_tokens * (2 * 4 * 4 * s.d + merged) if "projector" in parts or vision_grad else 0
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


def _state_bytes(counts: Counts, setting: Setting, frozen_bytes: int) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer, buffers) per GPU."""
    p, t, g, a = counts.total, counts.trainable, setting.gpus, DTYPE_BYTES[setting.compute]
    if setting.strategy == "ddp":
        buckets = 4 * t if g > 1 else 0
        return 4 * t + frozen_bytes * (p - t), 4 * t, 8 * t, buckets
    if setting.strategy == "fsdp":
        # gathered in the compute dtype: two layers (the next one prefetched) and the output embedding; a group's
        # unsharded gradients (compute dtype) and their fp32 reduce-scatter input, one group at a time
        group = max(counts.llm_layer_trainable, counts.vision_layer_trainable, counts.head_trainable)
        return 4 * p / g, 4 * t / g, 8 * t / g, a * (2 * counts.largest_layer + counts.head) + (a + 4) * group
    # zero3 (configs/zero3.yaml): bf16 partitions + replicated small tensors, fp32 master + grads + AdamW
    live = min(1e9, p) * a  # stage3_max_live_parameters
    bucket = min(1e9, t) * a  # reduce_bucket_size
    return (a * (p - counts.persistent) / g + a * counts.persistent + 4 * t / g, 4 * t / g, 8 * t / g, live + bucket)


def _backward_peak(counts: Counts, setting: Setting, acts: Activations, grads: float) -> float:
    """Peak of activations + gradients over one step: backward frees each layer's activations as its
    gradients appear (LLM top-down, then the vision tower); with accumulation the gradients stay."""
    b, g = setting.per_device, setting.gpus if setting.strategy != "ddp" else 1
    if setting.accumulation > 1:
        return grads + b * acts.total + acts.peak_extra
    live = b * acts.total
    layer_grads = 4 * (acts.llm_layers * counts.llm_layer_trainable + acts.vision_layers * counts.vision_layer_trainable) / g
    live += grads - layer_grads  # lm_head, embeddings, projector: counted up front
    peak = live
    for layers, kept, trainable in ((acts.llm_layers, acts.llm_layer, counts.llm_layer_trainable),
                                    (acts.vision_layers, acts.vision_layer, counts.vision_layer_trainable)):
        for _ in range(layers):
            live += 4 * trainable / g - b * kept
            peak = max(peak, live)
    return max(peak + acts.peak_extra, grads)


def plan(config: Any, setting: Setting, gpu_memory_gb: float | None = None, name: str = "") -> Plan:
    """Per-GPU memory of ``setting`` on ``config``; with ``gpu_memory_gb`` also the largest batch that fits."""
    counts = count_parameters(config, setting)
    frozen = DTYPE_BYTES[setting.compute] if setting.strategy == "ddp" else 4
    weights, grads, optim, buffers = _state_bytes(counts, setting, frozen)
    acts = activation_bytes(config, setting, counts)
    other = activation_bytes(config, Setting(**{**setting.__dict__,
                                                "gradient_checkpointing": not setting.gradient_checkpointing}), counts)
    per_sample = acts.total
    activations = setting.per_device * per_sample + acts.peak_extra
    peak_live = _backward_peak(counts, setting, acts, grads)
    shapes = Shapes.of(config, setting)
    result = Plan(name or "model", setting, counts, shapes.seq, weights, grads, optim, buffers, activations, peak_live,
                  per_sample, other.total, images=shapes.images(setting))
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
    s = Shapes.of(config, setting)
    parts = set(setting.trainable)
    cross = config.ias_fusion == "cross_attention"
    n = s.vision_tokens
    span = n  # keys per query; Qwen2.5-VL: a window in most blocks, the image in the full-attention ones
    if s.qwen:
        span = (s.full_layers * n + (s.vision_layers - s.full_layers) * s.window) / s.vision_layers
    mlp = 3 if s.qwen else 2  # SwiGLU: gate, up, down
    vit = 2 * n * (4 * s.d * s.d + mlp * s.d * s.vision_mlp) + 4 * n * span * s.d
    xattn = (2 * n * 4 * s.d * s.d + 4 * n * span * s.d) if cross else 0
    vision_grad = (cross and "cross_attention" in parts) or "vision" in parts
    vision = s.tiles * s.vision_layers * (vit * (3 if "vision" in parts else 2 if vision_grad else 1)
                                          + xattn * (3 if "cross_attention" in parts else 2))
    projector = 3 * 2 * s.image_tokens * ((16 * s.d * s.d + 4 * s.d * s.h) if s.qwen else (4 * s.d * s.h + s.h * s.h))
    llm_token = 2 * (2 * s.h * s.h + 2 * s.h * s.kv + 3 * s.h * s.mlp) + 2 * s.seq * s.h
    llm = s.layers * s.seq * llm_token * (3 if "llm" in parts and not setting.lora else 2)
    head = 3 * 2 * s.labelled * s.h * s.vocab
    return float(vision + projector + llm + head)
