"""CLI: ``ase-mllm finetune`` (stage 2 training; runs unchanged under torchrun), ``ase-mllm plan`` and
``ase-mllm convert-base`` (original InternVL2 checkpoint -> native)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages import families


def register(app: typer.Typer) -> None:
    @app.command()
    def finetune(
        dataset: str = typer.Option(..., "--dataset", help="Ingested dataset to train on."),
        run: str = typer.Option("default", "--run-name", "--run", help="Run name: runs/<dataset>/<run>/ (under "
                                                                         "torchrun spell it --run-name)."),
        base: Optional[Path] = typer.Option(None, "--base", help="Local HF InternVL or Qwen2.5-VL dir; its "
                                                                 "config.json picks the family (default: manifest's)."),
        fusion: str = typer.Option("cross_attention", "--fusion", help="cross_attention, or none (w/o IASC)."),
        max_steps: int = typer.Option(-1, "--max-steps", help="Stop after N optimizer steps (overrides epochs)."),
        epochs: float = typer.Option(1.0, "--epochs"),
        lr: float = typer.Option(4e-5, "--lr", help="Peak learning rate (paper: 4e-5)."),
        cross_attention_lr: Optional[float] = typer.Option(None, "--cross-attention-lr",
                                                           help="Peak lr of the new cross-attention layers "
                                                                "(default: --lr)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch (default per dataset)."),
        per_device: int = typer.Option(4, "--per-device", help="Per-device batch; the rest by accumulation."),
        trainable: str = typer.Option("cross_attention,projector,llm", "--trainable",
                                      help="Comma list of vision, cross_attention, projector, llm."),
        lora: bool = typer.Option(False, "--lora", help="LoRA on the LLM instead of full LLM weights."),
        max_tiles: int = typer.Option(12, "--max-tiles", help="Up to this many 448 px tiles per image (paper: 40)."),
        max_pixels: Optional[int] = typer.Option(None, "--max-pixels",
                                                 help="Qwen2.5-VL family: pixels per image after resizing "
                                                      "(default: the base's preprocessor_config.json)."),
        max_length: Optional[int] = typer.Option(None, "--max-length",
                                                 help="Cap on tokens per example (default: the data's longest); "
                                                      "longer critiques are truncated and counted."),
        strategy: str = typer.Option("ddp", "--strategy", help="Multi-GPU strategy: ddp, fsdp (FSDP2) or zero3 "
                                                                "(DeepSpeed ZeRO-3)."),
        gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                     help="Recompute each layer in backward (far less memory)."),
        precision: str = typer.Option("auto", "--precision", help="auto (bf16 GPUs: bf16, older GPUs: fp16 + "
                                                                  "loss scaling, CPU: fp32), bf16, fp16 or fp32."),
        allow_missing_saliency: bool = typer.Option(False, "--allow-missing-saliency",
                                                    help="Uniform map for images the saliency stage has not done."),
        saliency: str = typer.Option("eat", "--saliency",
                                     help="Maps from: eat (the saliency store), uniform (none), truth (synthetic "
                                          "masks), shuffled (another image's synthetic mask), moved "
                                          "(the synthetic mask moved onto another subject)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Train on the first N pairs only."),
        workers: int = typer.Option(4, "--workers", help="DataLoader workers per process."),
        save_steps: int = typer.Option(500, "--save-steps"),
        keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", min=1,
                                             help="How many of the newest checkpoint-N/ to keep (a learning curve "
                                                  "scores each)."),
        logging_steps: int = typer.Option(10, "--logging-steps"),
        seed: int = typer.Option(0, "--seed"),
        log_sample_ids: bool = typer.Option(False, "--log-sample-ids", help="Log each rank's sample ids."),
        report_to: str = typer.Option("tensorboard", "--report-to",
                                      help="Training curves to: tensorboard (<run dir>/tensorboard/), wandb or none."),
        tiny_model: str = typer.Option("tiny", "--tiny-model",
                                       help="Registered small model to build when there is no base: "
                                            f"{families.model_names(tiny_only=True)}."),
    ) -> None:
        """Fine-tune the saliency-enhanced MLLM on a dataset's critiques (resumes if interrupted)."""
        from pipeline.context import manifest
        from stages.finetune.train import TrainConfig
        from stages.finetune.train import finetune as run_finetune

        cfg = TrainConfig(
            dataset=dataset, run=run, base=str(base) if base else None, fusion=fusion, max_steps=max_steps,
            epochs=epochs, learning_rate=lr, cross_attention_lr=cross_attention_lr, global_batch_size=batch_size,
            per_device_batch_size=per_device,
            trainable=tuple(p.strip() for p in trainable.split(",") if p.strip()), lora=lora, max_tiles=max_tiles,
            max_pixels=max_pixels,
            max_length=max_length, strategy=strategy, gradient_checkpointing=gradient_checkpointing,
            precision=precision,
            allow_missing_saliency=allow_missing_saliency, saliency=saliency, limit=limit, workers=workers, save_steps=save_steps,
            save_total_limit=keep_checkpoints,
            logging_steps=logging_steps, seed=seed, log_sample_ids=log_sample_ids, tiny_model=tiny_model,
            report_to=report_to,
        )
        run_finetune(cfg, manifest())

    @app.command()
    def plan(
        base: str = typer.Option(..., "--base", help="Checkpoint dir, its config.json, or a registered config: "
                                                     f"{families.model_names()}."),
        max_tiles: int = typer.Option(12, "--max-tiles", help="InternVL: tiles per image."),
        max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Qwen2.5-VL: pixels per image "
                                                                           "(default 1,003,520 = 1,280 LLM tokens)."),
        per_device: int = typer.Option(1, "--per-device", help="Per-device batch."),
        gpus: int = typer.Option(1, "--gpus"),
        strategy: str = typer.Option("ddp", "--strategy", help="ddp, fsdp or zero3."),
        gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="GB per GPU: also report the largest "
                                                                              "per-device batch that fits."),
        gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing"),
        lora: bool = typer.Option(False, "--lora", help="LoRA on the LLM instead of full LLM weights."),
        trainable: str = typer.Option("cross_attention,projector,llm", "--trainable"),
        text_tokens: int = typer.Option(256, "--text-tokens", help="Prompt + critique tokens per example."),
        precision: str = typer.Option("bf16", "--precision", help="Compute dtype: bf16, fp16 or fp32."),
    ) -> None:
        """Per-GPU memory of a fine-tuning setting (weights, gradients, optimizer, activations); reads no weights."""
        from stages.finetune.plan import Setting, load_model_config
        from stages.finetune.plan import plan as make_plan
        from stages.finetune.sharding import STRATEGIES

        if strategy not in STRATEGIES:
            raise typer.BadParameter(f"--strategy must be one of {', '.join(STRATEGIES)}")
        setting = Setting(max_tiles=max_tiles, max_pixels=max_pixels, per_device=per_device, gpus=gpus,
                          strategy=strategy,
                          gradient_checkpointing=gradient_checkpointing, lora=lora,
                          trainable=tuple(p.strip() for p in trainable.split(",") if p.strip()),
                          text_tokens=text_tokens, compute=precision)
        result = make_plan(load_model_config(base), setting, gpu_memory, name=Path(base).name)
        typer.echo(result.table())
        typer.echo(result.line())

    @app.command("convert-base")
    def convert_base(
        src: Path = typer.Argument(..., help="Original OpenGVLab InternVL2 / InternVL2.5 checkpoint directory."),
        out: Path = typer.Argument(..., help="Native transformers InternVL directory to write (for --base)."),
        max_shard_size: int = typer.Option(2 * 1024**3, "--max-shard-size", help="Bytes per output shard."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it holds another conversion."),
    ) -> None:
        """Convert an original InternVL2 checkpoint to native transformers classes (no remote code runs)."""
        from stages.families.internvl.convert import convert

        typer.echo(convert(src, out, max_shard_bytes=max_shard_size, overwrite=overwrite).line())
