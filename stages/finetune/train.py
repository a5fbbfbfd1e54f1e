"""Stage-2 fine-tuning with the HF Trainer: paper recipe, trainable parts, LoRA, crash-resume.

Run dir ``runs/<dataset>/<run>/``: ``run_config.json`` (resolved config), ``tokenizer/`` (demo
BPE), ``checkpoint-N/`` (HF Trainer: safetensors weights, optimizer, RNG, trainer_state.json; under FSDP
the weights and optimizer as per-rank distributed-checkpoint shards), ``metrics.jsonl`` (every Trainer log),
``tensorboard/`` (the same curves, ``--report-to``), ``final/`` (weights + tokenizer, written via temp + rename).
Under ZeRO-3 a checkpoint holds DeepSpeed's per-rank shards (``global_stepN/``); ``final/`` alone the full weights.
Every training log carries loss, lr, the cross-attention gates' magnitudes and the throughput since the previous
log.
Rerunning the same command resumes from the newest *complete* checkpoint: the Trainer writes
``trainer_state.json`` last, so a checkpoint without a readable one was cut off and is removed.
Works unchanged under ``torchrun``: ``strategy`` ddp (replicated), fsdp (FSDP2) or zero3 (DeepSpeed
ZeRO-3), see sharding.py; gloo on CPU. The precision policy (precision.py) and the memory plan
(plan.py) are printed before training starts.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerState, TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from pipeline.errors import PipelineError
from pipeline.manifest import Manifest
from pipeline.paths import runs_dir
from stages.families.fusion import FUSIONS
from stages.finetune.parts import LORA_TARGETS, PARTS, part_of
from stages.finetune.saliency_source import SOURCES
from stages.finetune.precision import PRECISIONS
from stages.finetune.sharding import STRATEGIES, builds_on_meta, strategy
from storage.atomic import write_json_atomic

GLOBAL_BATCH = {"dpc2022": 64, "pccd": 16, "rpcd": 16}  # paper, Sec. IV-A
DEFAULT_GLOBAL_BATCH = 16
REPORT_TO = ("tensorboard", "wandb", "none")  # where training curves go (the Trainer's own integrations)


@dataclass
class TrainConfig:
    dataset: str
    run: str = "default"
    base: str | None = None  # local HF InternVL or Qwen2.5-VL dir (stages/families); None: manifest's, else a tiny model
    fusion: str = "cross_attention"  # or "none" (the "w/o IASC" ablation)
    split: str = "train"
    # paper recipe
    learning_rate: float = 4e-5
    cross_attention_lr: float | None = None  # peak lr of the new (zero-gated) cross-attention; None: learning_rate
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    global_batch_size: int | None = None  # None: GLOBAL_BATCH[dataset] (16 when unknown)
    per_device_batch_size: int = 4  # the rest comes from gradient accumulation
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    precision: str = "auto"  # auto: bf16 autocast on bf16 GPUs, fp16 + loss scaling on older GPUs, fp32 on CPU
    strategy: str = "ddp"  # ddp | fsdp | zero3 (sharding.py)
    gradient_checkpointing: bool = False
    # what trains
    trainable: tuple[str, ...] = ("cross_attention", "projector", "llm")
    lora: bool = False  # LoRA adapters on the LLM instead of full LLM weights
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # data
    max_tiles: int = 12
    min_tiles: int = 1
    use_thumbnail: bool = True
    max_pixels: int | None = None  # Qwen2.5-VL family: image pixel budget (None: the base's processor config)
    max_length: int | None = None  # cap on tokens per example; None: the longest example of the data
    allow_missing_saliency: bool = False
    saliency: str = "eat"  # where maps come from: eat | uniform | truth (stages/finetune/saliency_source.py)
    limit: int | None = None  # train on the first N pairs only (smoke tests)
    workers: int = 4
    # demo model / tokenizer (only when there is no base)
    tiny_model: str = "tiny"
    vocab_size: int = 2048
    # bookkeeping
    seed: int = 0
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    log_sample_ids: bool = False  # write each rank's sample ids to samples/rank<r>.txt
    report_to: str = "tensorboard"  # REPORT_TO: tensorboard writes <run dir>/tensorboard/
    extra: dict[str, Any] = field(default_factory=dict)  # passed to TrainingArguments

    def __post_init__(self) -> None:
        bad = [p for p in self.trainable if p not in PARTS]
        if bad:
            raise ValueError(f"unknown trainable part(s) {bad}; choose from {', '.join(PARTS)}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.saliency not in SOURCES:
            raise ValueError(f"saliency must be one of {SOURCES}, got {self.saliency!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {REPORT_TO}, got {self.report_to!r}")
        self.trainable = tuple(self.trainable)


@dataclass(frozen=True)
class Summary:
    run_dir: Path
    global_step: int
    start_loss: float | None
    end_loss: float | None
    missing_saliency: int
    resumed_from: Path | None
    max_length: int | None = None
    truncated: int = 0  # critiques cut to fit max_length

    def line(self) -> str:
        fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        resumed = f", resumed from {self.resumed_from.name}" if self.resumed_from else ""
        missing = f", {self.missing_saliency} images with a uniform saliency map" if self.missing_saliency else ""
        truncated = f", {self.truncated} critiques truncated to max_length {self.max_length}" if self.truncated else ""
        return (f"finetune {self.run_dir}: {self.global_step} steps{resumed}, "
                f"loss {fmt(self.start_loss)} -> {fmt(self.end_loss)}{missing}{truncated}")


# ---------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    return int(name.split("-", 1)[1]) if name.startswith("checkpoint-") and name[11:].isdigit() else None


FSDP_SHARDS = "pytorch_model_fsdp_0"  # accelerate's distributed-checkpoint folder of the model (SHARDED_STATE_DICT)
ZERO_LATEST = "latest"  # DeepSpeed's pointer to its checkpoint folder (global_stepN/: per-rank model and optimizer shards)


def shard_files(ckpt: Path) -> list[Path]:
    """A sharded checkpoint's per-rank weight files: FSDP's distributed-checkpoint shards or DeepSpeed ZeRO-3's
    model states (one per rank each)."""
    return [*(ckpt / FSDP_SHARDS).glob("*.distcp"), *ckpt.glob("global_step*/zero_pp_rank_*_model_states.pt")]


def is_complete(ckpt: Path) -> bool:
    """The Trainer writes trainer_state.json last (after every rank's shards under FSDP and ZeRO-3); a readable one
    marks a finished checkpoint, once every rank of a sharded one has also written its RNG state."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    ranks = len(shard_files(ckpt))  # one shard file per rank
    if ranks > 1 and not all((ckpt / f"rng_state_{r}.pth").exists() for r in range(ranks)):
        return False  # rank 0 wrote its state while another rank was still saving its RNG state
    return any((ckpt / f).exists() for f in ("model.safetensors", "model.safetensors.index.json",
                                             "adapter_model.safetensors", f"{FSDP_SHARDS}/.metadata", ZERO_LATEST))


def is_sharded(ckpt: Path) -> bool:
    """An FSDP or ZeRO-3 checkpoint: per-rank shards, no full model to load in one process."""
    return (ckpt / FSDP_SHARDS / ".metadata").exists() or (
        (ckpt / ZERO_LATEST).exists() and not (ckpt / "config.json").exists())


def last_checkpoint(run_dir: Path, remove_incomplete: bool = False) -> Path | None:
    """Newest complete ``checkpoint-N``; incomplete ones are deleted when asked."""
    if not run_dir.is_dir():
        return None
    ckpts = sorted((p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step)
    complete = []
    for ckpt in ckpts:
        if is_complete(ckpt):
            complete.append(ckpt)
        elif remove_incomplete:
            print(f"finetune: removing incomplete {ckpt} (the previous run stopped while writing it)")
            shutil.rmtree(ckpt, ignore_errors=True)
    return complete[-1] if complete else None


# ---------------------------------------------------------------- model parts


def set_trainable(model: nn.Module, parts: tuple[str, ...]) -> dict[str, int]:
    """Freeze everything except ``parts``; returns trainable parameter counts per part."""
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        part = part_of(name)
        if part is None:
            raise ValueError(f"parameter {name} belongs to no trainable part ({', '.join(PARTS)})")
        p.requires_grad_(part in parts)
        if part in parts:
            counts[part] += getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitioned parameters report 0 elements
    return counts


def apply_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """LoRA on the LLM's linear layers; the other chosen parts stay fully trainable (and saved)."""
    from peft import LoraConfig, get_peft_model

    from stages import families

    names = families.of_train(cfg.base, cfg.tiny_model).lora_modules
    full = set(cfg.trainable) - {"llm"}
    keep = [names["vision"]] if "vision" in full else (["cross_attention"] if "cross_attention" in full else [])
    keep += [names["projector"]] if "projector" in full else []
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=LORA_TARGETS, modules_to_save=keep)
    return get_peft_model(model, lora)


# ---------------------------------------------------------------- trainer pieces


class _MetricsLog(TrainerCallback):
    """Append every Trainer log (loss, lr, grad norm) to ``metrics.jsonl`` (main process)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class _ProgressBar(ProgressCallback):
    """The Trainer's tqdm bar (steps, ETA) with the latest loss as its postfix: no per-log dict dumps in the
    terminal (every log still goes to ``metrics.jsonl``)."""

    def __init__(self, run: str) -> None:
        super().__init__()
        self.run = run

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(f"finetune {self.run}")
            self.training_bar.unit = "step"

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero and self.training_bar is not None and isinstance((logs or {}).get("loss"), float):
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)


INPUT_TOKENS = "input_tokens"  # the batch entry counting its non-padding tokens on the host (TokenCounting)


@dataclass
class TokenCounting:
    """A family's collator whose batches also count their non-padding input tokens, on the host (in the loader's
    worker): the Trainer's own count reads a device tensor and gathers it on every micro-batch."""

    collator: Any

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        batch[INPUT_TOKENS] = int(batch["attention_mask"].sum())
        return batch


class CritiqueTrainer(Trainer):
    """The HF Trainer, plus an optional per-rank log of the sample ids each step trained on.

    Resume loads checkpoint weights through ``from_pretrained``: ``save_pretrained`` writes InternVL
    in its original key layout (``vision_tower.*``, ``language_model.*``), which the Trainer's plain
    ``load_state_dict`` would silently fail to match (transformers 5.x), restarting from scratch.
    """

    def __init__(self, *args: Any, sample_log: Path | None = None, cross_attention_lr: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sample_log = sample_log
        self.cross_attention_lr = cross_attention_lr
        self._last_log: tuple[float, int, int] | None = None  # (time, global step, input tokens) of the last log
        self._input_tokens = 0  # non-padding input tokens of this rank's micro-batches (host counts: input_tokens)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs also carry the gates' magnitudes and the throughput since the previous log. Added here,
        before any callback runs: callbacks given to the Trainer see a log after its reporting integrations
        (TensorBoard, W&B) have written it. Every rank calls ``log`` (sharded gates are gathered, the ranks' token
        counts summed: the only reads from the device, at logging steps)."""
        if "loss" in logs:
            logs.update(gate_magnitudes(self.model))
            now, last = (time.time(), self.state.global_step, self._tokens_all_ranks()), self._last_log
            if last is not None and now[1] > last[1] and now[0] > last[0]:
                seconds, a = now[0] - last[0], self.args
                samples = (now[1] - last[1]) * a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
                logs["samples_per_second"] = samples / seconds
                logs["tokens_per_second"] = (now[2] - last[2]) / seconds  # non-padding input tokens, all ranks
            self._last_log = now
        super().log(logs, start_time)

    def _tokens_all_ranks(self) -> int:
        """Non-padding input tokens this run has trained on so far, summed over the ranks."""
        mine = torch.tensor([self._input_tokens], device=self.args.device)
        return int(self.accelerator.gather(mine).sum()) if self.args.world_size > 1 else self._input_tokens

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.cross_attention_lr is not None:
            own_lr_for_cross_attention(optimizer, self.model, self.cross_attention_lr)
        return optimizer

    def create_accelerator_and_postprocess(self) -> None:
        from stages.finetune.sharding import enable_fsdp_on_cpu, fsdp_mixed_precision

        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)
        fsdp_mixed_precision(self)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The Trainer's move to the device, except that raw saliency maps keep their fp32: under DeepSpeed it casts
        every floating input to the engine's dtype (bf16), which would round the maps before their min-max
        normalisation."""
        maps = inputs.pop("saliency_maps", None)
        inputs = super()._prepare_inputs(inputs)
        if maps is not None:
            inputs["saliency_maps"] = maps.to(self.args.device)
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        """The model's loss; first the batch's host-side entries (counted tokens, sample ids) are taken out."""
        self._input_tokens += inputs.pop(INPUT_TOKENS, 0)
        ids = inputs.pop("sample_ids", None)
        if ids is not None and self.sample_log is not None:
            with open(self.sample_log, "a") as fh:
                fh.write(" ".join(str(i) for i in ids) + "\n")
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP and ZeRO-3 a checkpoint's model is the sharded state the Trainer writes beside the optimizer's
        (nothing here); an explicit save (``final/``) gathers the full weights, which rank 0 writes as safetensors.
        Every rank must call it."""
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if not (self.is_fsdp_enabled or zero3):
            return super().save_model(output_dir, _internal_call)
        if _internal_call:
            return None
        if zero3:  # the engine's own gather (configs/zero3.yaml gathers nothing at checkpoints)
            state_dict = self.model_wrapped._zero3_consolidated_16bit_state_dict()  # collective; full weights on rank 0
        else:
            state_dict = self.accelerator.get_state_dict(self.model)  # collective; the full weights on rank 0 (CPU)
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = model if model is not None else self.model
        ckpt = Path(resume_from_checkpoint)
        if self.is_fsdp_enabled:  # first: its own files load into the sharded (DTensor) parameters, adapters too
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if (ckpt / "adapter_model.safetensors").exists():
            return _load_adapter(model, ckpt / "adapter_model.safetensors")
        if not isinstance(model, PreTrainedModel) or not (ckpt / "config.json").exists():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # fp32 holds both the fp32 trainable and the compute-dtype frozen weights exactly; copy_ keeps each dtype
        loaded = type(model).from_pretrained(str(ckpt), config=model.config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)


def gate_magnitudes(model: nn.Module) -> dict[str, float]:
    """Mean |gate| of the new cross-attention per vision layer (``gate/layerNN``), their mean and largest: 0 while
    the model equals its base, growing as IASC opens. Gathers FSDP2 and ZeRO-3 shards (every rank must call it)."""
    gates = [p for name, p in model.named_parameters()
             if p.requires_grad and part_of(name) == "cross_attention" and name.endswith("gate")]
    if not gates:
        return {}
    partitioned = [p for p in gates if hasattr(p, "ds_id")]  # ZeRO-3
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            return gate_magnitudes_of([p.detach().clone() for p in gates])
    return gate_magnitudes_of([p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in gates])  # DTensor


def gate_magnitudes_of(gates: list[torch.Tensor]) -> dict[str, float]:
    means = [g.float().abs().mean().item() for g in gates]
    return {"gate/mean_abs": sum(means) / len(means), "gate/max_abs": max(g.float().abs().max().item() for g in gates),
            **{f"gate/layer{i:02d}": m for i, m in enumerate(means)}}


def own_lr_for_cross_attention(optimizer: torch.optim.Optimizer, model: nn.Module, lr: float) -> int:
    """Move the cross-attention parameters into groups of their own (same weight decay) with peak ``lr`` (the
    scheduler, created next, scales every group alike); returns how many parameters moved. New layers that
    start zero-gated hardly move at a pretrained model's small lr (as LLaVA trains its new projector faster)."""
    ids = {id(p) for name, p in model.named_parameters() if part_of(name) == "cross_attention"}
    moved = []
    for group in optimizer.param_groups:
        own = [p for p in group["params"] if id(p) in ids]
        if own:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
            moved.append({**{k: v for k, v in group.items() if k != "params"}, "params": own, "lr": lr})
    optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
    for group in moved:
        optimizer.add_param_group(group)
    return sum(len(g["params"]) for g in moved)


def _load_adapter(model: nn.Module, path: Path) -> None:
    """Load a peft adapter checkpoint (LoRA + modules_to_save) back into the live PeftModel.

    peft's own loader fails on modules_to_save nested in this model (KeyError); saved keys are the
    model's keys without the adapter name, so map them back by dropping it.
    """
    from safetensors.torch import load_file

    def saved_name(key: str) -> str:
        return key.replace(".modules_to_save.default.", ".").replace(".default.", ".")

    targets = {saved_name(k): k for k in model.state_dict() if ".default." in k}
    saved = load_file(str(path))
    missing = sorted(set(saved) - set(targets))
    if missing:
        raise RuntimeError(f"{path}: {len(missing)} adapter tensors match no parameter (e.g. {missing[0]})")
    model.load_state_dict({targets[k]: v for k, v in saved.items()}, strict=False)


# ---------------------------------------------------------------- the run


def resolve(cfg: TrainConfig, manifest: Manifest | None) -> TrainConfig:
    """Fill the defaults that depend on the dataset, the manifest and the hardware."""
    from stages.finetune import precision

    base = cfg.base if cfg.base is not None else (str(manifest.mllm.base) if manifest and manifest.mllm.base else None)
    batch = cfg.global_batch_size or GLOBAL_BATCH.get(cfg.dataset.lower(), DEFAULT_GLOBAL_BATCH)
    compute = precision.choose(cfg.precision, cfg.strategy).compute
    return replace(cfg, base=base, global_batch_size=batch, precision=compute)


def model_config(cfg: TrainConfig) -> Any:
    """The model's config before the model exists (the base's config.json, or the tiny config)."""
    from stages import families
    from stages.finetune.plan import load_model_config

    if cfg.base:
        return load_model_config(cfg.base, cfg.fusion)
    return families.of_tiny(cfg.tiny_model).tiny_config(cfg.tiny_model, cfg.vocab_size, cfg.fusion)


def training_arguments(cfg: TrainConfig, run_dir: Path, config: Any = None) -> TrainingArguments:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = min(cfg.per_device_batch_size, max(1, cfg.global_batch_size // world))
    accumulation = max(1, cfg.global_batch_size // (per_device * world))
    if per_device * world * accumulation != cfg.global_batch_size:
        print(f"finetune: global batch {per_device}x{world}x{accumulation} = {per_device * world * accumulation} "
              f"(asked {cfg.global_batch_size})")
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler,
        optim="adamw_torch_fused" if torch.cuda.is_available() and strategy(cfg.strategy).fused_adamw else "adamw_torch",
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=cfg.workers,
        dataloader_persistent_workers=cfg.workers > 0,
        remove_unused_columns=False,
        report_to=cfg.report_to,
        run_name=f"{cfg.dataset}/{cfg.run}",
        include_num_input_tokens_seen="no",  # counted on the host instead (TokenCounting): no read per micro-batch
        logging_nan_inf_filter=False,  # its isnan test reads every micro-batch's loss back from the device
        ddp_backend="gloo" if world > 1 and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
    )
    kwargs.update(strategy(cfg.strategy).training_kwargs(config if config is not None else model_config(cfg),
                                                         cfg.gradient_checkpointing))
    kwargs.update(cfg.extra)
    return TrainingArguments(**kwargs)


def build_tokenizer(cfg: TrainConfig, run_dir: Path):  # noqa: ANN201
    from stages import families
    from stages.families.data import pairs

    base_family = families.of_train(cfg.base, cfg.tiny_model)
    if cfg.base:
        return base_family.load_tokenizer(Path(cfg.base))
    _, comments = pairs(cfg.dataset, cfg.split)
    return base_family.dataset_tokenizer(comments["text"].to_pylist(), run_dir / "tokenizer", cfg.vocab_size)


def build_model(cfg: TrainConfig, tokenizer, policy: Any = None, meta: bool = False) -> nn.Module:  # noqa: ANN001
    """The base (fp32 master weights) or the tiny demo model, parts frozen, cast by the precision policy.

    ``meta``: parameters without storage (an FSDP rank that receives its shards from rank 0, sharding.builds_on_meta).
    """
    from stages import families
    from stages.finetune import precision

    base_family = families.of_train(cfg.base, cfg.tiny_model)
    # buffers (rope tables) are computed, not loaded: they stay real
    with init_empty_weights(include_buffers=False) if meta else contextlib.nullcontext():
        if cfg.base and meta:
            model = base_family.model_class()(model_config(cfg))
        elif cfg.base:
            model, missing = base_family.load_base(Path(cfg.base), fusion=cfg.fusion, dtype=torch.float32)
            if missing:
                print(f"finetune: {len(missing)} new parameters initialised (not in {cfg.base})")
        else:
            model = base_family.build_tiny(cfg.tiny_model, tokenizer, cfg.fusion)
    if meta:
        model.tie_weights()  # init_empty_weights makes a new Parameter per name, untying shared ones
    if cfg.lora:
        model = apply_lora(model, cfg)
    else:
        set_trainable(model, cfg.trainable)
    if policy is not None:
        precision.apply(model, policy)
    return model


def open_store(cfg: TrainConfig, manifest: Manifest | None):  # noqa: ANN201
    """The run's saliency source (store-like), or None for uniform maps where that is allowed."""
    from stages.finetune.saliency_source import open_saliency

    allow = cfg.allow_missing_saliency or cfg.saliency == "uniform"
    store, why = open_saliency(cfg.saliency, cfg.dataset, manifest, allow)
    if store is None:
        print(f"finetune: no saliency maps ({why}); every image gets the uniform map")
    return store


def finetune(cfg: TrainConfig, manifest: Manifest | None, callbacks: tuple[TrainerCallback, ...] = ()) -> Summary:
    """Train (or resume) one run; returns the start / end loss summary. ``callbacks`` join the Trainer's."""
    from stages import families
    from stages.finetune import precision
    cfg = resolve(cfg, manifest)
    run_dir = runs_dir(cfg.dataset) / cfg.run
    if cfg.report_to == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise PipelineError("--report-to wandb needs the wandb package (`pip install wandb`, then `wandb login`); "
                                "or use --report-to tensorboard")
        os.environ.setdefault("WANDB_DIR", str(run_dir))
    families.check_run(run_dir, families.of_train(cfg.base, cfg.tiny_model))
    run_dir.mkdir(parents=True, exist_ok=True)
    config = model_config(cfg)
    args = training_arguments(cfg, run_dir, config)
    strategy(cfg.strategy).prepare()  # before the model (ZeRO-3 partitions it as it is built)
    policy = precision.choose(cfg.precision, cfg.strategy)
    main = args.process_index == 0
    if main:
        print(policy.line())
    set_seed(cfg.seed)
    with args.main_process_first(desc="tokenizer + checkpoint check"):
        tokenizer = build_tokenizer(cfg, run_dir)
        resume = last_checkpoint(run_dir, remove_incomplete=main)
    base_family = families.of_train(cfg.base, cfg.tiny_model)
    spec = base_family.data_spec(cfg, config)  # TileSpec (InternVL) or ImageSpec (Qwen2.5-VL)
    data = base_family.dataset(cfg, tokenizer, spec, open_store(cfg, manifest))
    if main:
        print(memory_plan(cfg, config, args, data).line())
    model = build_model(cfg, tokenizer, policy, meta=builds_on_meta(args))
    if main:
        write_json_atomic(run_dir / "run_config.json", {
            **asdict(cfg), **families.spec_record(base_family, spec), "world_size": args.world_size,
            "per_device_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "train_pairs": len(data),
            "max_length_used": data.max_length, "truncated": data.truncated,
        })
    sample_log = None
    if cfg.log_sample_ids:
        (run_dir / "samples").mkdir(exist_ok=True)
        sample_log = run_dir / "samples" / f"rank{args.process_index}.txt"
    trainer = CritiqueTrainer(
        model=model, args=args, train_dataset=data,
        data_collator=TokenCounting(base_family.collator(tokenizer, cfg.log_sample_ids)),
        callbacks=[_MetricsLog(run_dir / "metrics.jsonl"), *callbacks], sample_log=sample_log,
        cross_attention_lr=cfg.cross_attention_lr if cfg.fusion != "none" else None,
    )
    for callback in trainer.callback_handler.callbacks:  # curves under the run's folder (read at train begin)
        if type(callback).__name__ == "TensorBoardCallback":
            callback.logging_dir = str(run_dir / "tensorboard")
    if not args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_ProgressBar(f"{cfg.dataset}/{cfg.run}"))
    state = TrainerState.load_from_json(str(resume / "trainer_state.json")) if resume else None
    recover_final(run_dir / "final")
    finished = state is not None and (run_dir / "final" / "config.json").exists() and (
        state.global_step >= cfg.max_steps if cfg.max_steps > 0 else (state.epoch or 0) >= cfg.epochs)
    if finished:  # a rerun of a completed run: resuming would take one more step past the end
        trainer.state = state
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        save_final(trainer, tokenizer, run_dir / "final")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = Summary(run_dir, trainer.state.global_step, losses[0] if losses else None,
                      losses[-1] if losses else None, data.missing_saliency, resume, data.max_length, data.truncated)
    if trainer.is_world_process_zero():
        print(summary.line())
    leave_process_group()
    return summary


def leave_process_group() -> None:
    """Under torchrun: wait for every rank, then close the process group, so no rank exits while another still
    talks to it (a rank leaving with gloo's threads alive can abort with "terminate called ...")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def memory_plan(cfg: TrainConfig, config: Any, args: TrainingArguments, data: Any) -> Any:
    """The plan (plan.py) of this run: its shapes, batch, strategy and longest example."""
    from stages.finetune.plan import Setting, plan

    setting = Setting(max_tiles=cfg.max_tiles, max_pixels=getattr(data, "max_pixels", None),  # Qwen2.5-VL: its budget
                      per_device=args.per_device_train_batch_size, gpus=args.world_size,
                      strategy=cfg.strategy, gradient_checkpointing=cfg.gradient_checkpointing,
                      trainable=cfg.trainable, lora=cfg.lora, lora_r=cfg.lora_r, text_tokens=data.text_tokens,
                      labelled_tokens=data.text_tokens, compute=cfg.precision,
                      accumulation=args.gradient_accumulation_steps)
    gpu = torch.cuda.get_device_properties(args.device).total_memory / 1024**3 if torch.cuda.is_available() else None
    return plan(config, setting, gpu, name=Path(cfg.base).name if cfg.base else cfg.tiny_model)


def _final_siblings(target: Path) -> tuple[Path, Path]:
    """(temp dir being written, previous final being replaced) of ``target``."""
    return target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")


def save_final(trainer: Trainer, tokenizer, target: Path) -> None:  # noqa: ANN001
    """Final weights + tokenizer, written to a temp dir and renamed into place (see ``recover_final``).

    Every rank calls it: FSDP and ZeRO-3 gather the full weights collectively; rank 0 writes.
    """
    tmp, old = _final_siblings(target)
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    if not main:
        return
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.replace(old)
    tmp.replace(target)
    shutil.rmtree(old, ignore_errors=True)


def recover_final(target: Path) -> None:
    """Finish a ``save_final`` killed between its two renames.

    ``.final.old`` without ``final/`` means the temp dir was complete (it is written before the first
    rename), so it becomes ``final/``. Safe when every torchrun rank calls it at once.
    """
    tmp, old = _final_siblings(target)
    if not target.exists() and old.exists():
        try:
            tmp.replace(target)
        except FileNotFoundError:  # another rank renamed it first
            pass
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
