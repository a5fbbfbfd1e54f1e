"""Measure the peak memory of real CPU training steps (test helper, run in a fresh process).

Peak resident memory (VmHWM) minus the resident memory before the model exists, with glibc's
malloc returning every block of 64 KiB or more to the OS on free, so the resident size follows the
live tensors. Usage: python tests/memory_probe.py '<json list of cases>' -> one JSON line per case (plain training steps), or
torchrun --nproc_per_node 2 tests/memory_probe.py '<json case>' OUT_DIR -> OUT_DIR/rank<r>.json (Trainer steps
under the case's strategy).
"""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def build(case: dict):
    if case.get("family") == "qwen2_5_vl":
        return build_qwen(case)
    from transformers import Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    from stages.families.internvl.model import IASInternVLConfig, IASInternVLForConditionalGeneration

    v, t = case["vision"], case["text"]
    vision = InternVLVisionConfig(**v)
    grid = vision.image_size[0] // vision.patch_size[0]
    config = IASInternVLConfig(vision_config=vision, text_config=Qwen2Config(**t), image_token_id=t["vocab_size"] - 1,
                               image_seq_length=(grid // 2) ** 2, downsample_ratio=0.5)
    return config, IASInternVLForConditionalGeneration


def build_qwen(case: dict):
    """Qwen2.5-VL family: ``pixels`` per sample as one square image of (28 k)^2 pixels."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

    from stages.families.qwen.model import IASQwen2_5_VLConfig, IASQwen2_5_VLForConditionalGeneration

    v, t = case["vision"], case["text"]
    ids = dict(zip(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
                   range(t["vocab_size"] - 4, t["vocab_size"])))
    config = IASQwen2_5_VLConfig(vision_config=Qwen2_5_VLVisionConfig(**v, out_hidden_size=t["hidden_size"]),
                                 text_config=Qwen2_5_VLTextConfig(**t, bos_token_id=None, eos_token_id=None), **ids)
    return config, IASQwen2_5_VLForConditionalGeneration


def batch_qwen(config, case: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    b, text, labelled = case["per_device"], case["text_tokens"], case["labelled_tokens"]
    side = int(round(case["pixels"] ** 0.5)) // 14  # patches per side
    n_img = side * side // 4
    ids = torch.randint(0, config.text_config.vocab_size - 4, (b, n_img + text), generator=g)
    ids[:, 4:4 + n_img] = config.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -labelled:] = ids[:, -labelled:]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                mm_token_type_ids=(ids == config.image_token_id).int(),
                image_grid_thw=torch.tensor([[1, side, side]] * b),
                pixel_values=torch.randn(b * side * side, 3 * 2 * 14 * 14, generator=g),
                saliency_maps=torch.rand(b, 14, 14, generator=g))


def batch(config, case: dict) -> dict:
    from stages.families.internvl.collate import label_index, saliency_inputs
    from stages.families.internvl.model import tokens_per_tile

    if case.get("family") == "qwen2_5_vl":
        return batch_qwen(config, case)

    g = torch.Generator().manual_seed(0)
    b, tiles, text, labelled = case["per_device"], case["tiles"], case["text_tokens"], case["labelled_tokens"]
    n_img = tiles * tokens_per_tile(config)
    vocab = config.text_config.vocab_size
    ids = torch.randint(0, vocab - 1, (b, n_img + text), generator=g)
    ids[:, 4:4 + n_img] = config.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -labelled:] = ids[:, -labelled:]
    s = config.vision_config.image_size[0]
    positions, targets = label_index(labels)  # as the collator makes them
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, label_positions=positions,
                label_targets=targets, pixel_values=torch.randint(0, 256, (b * tiles, 3, s, s), generator=g, dtype=torch.uint8),
                **saliency_inputs([torch.rand(14, 14, generator=g) for _ in range(b)], [(tiles, 1, 0)] * b))


def measure(case: dict) -> dict:
    from stages.finetune.train import set_trainable

    config, cls = build(case)
    inputs = batch(config, case)
    gc.collect()
    base = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    torch.manual_seed(0)
    model = cls(config)
    set_trainable(model, tuple(case["trainable"]))
    if case["gradient_checkpointing"]:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    for _ in range(2):  # the second step runs with the AdamW states allocated
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = rss("VmHWM") - base
    del model, opt, loss
    gc.collect()
    return {"name": case["name"], "peak": peak}




def measure_trainer(case: dict, out: Path) -> None:
    """One rank of 2 real Trainer steps under ``case["strategy"]`` (torchrun, gloo) with the run's own wiring
    (training_arguments, precision policy, CritiqueTrainer), the batch of :func:`batch` each micro-batch.

    Peak resident memory from the first step on (the model is built, sharded and placed by then; what a GPU
    would hold) minus the resident memory before the model existed, written to ``out/rank<r>.json``.
    """
    from transformers import TrainerCallback

    from stages.finetune import precision
    from stages.finetune.sharding import strategy
    from stages.finetune.train import CritiqueTrainer, TrainConfig, set_trainable, training_arguments

    config, cls = build(case)
    inputs = batch(config, case)
    cfg = TrainConfig(dataset="probe", strategy=case["strategy"], precision=case["compute"], workers=0,
                      trainable=tuple(case["trainable"]), gradient_checkpointing=case["gradient_checkpointing"],
                      per_device_batch_size=case["per_device"], max_steps=2, save_steps=100, logging_steps=100,
                      global_batch_size=case["per_device"] * case["accumulation"] * int(os.environ["WORLD_SIZE"]),
                      extra={"disable_tqdm": True})
    args = training_arguments(cfg, out / "run", config)
    strategy(cfg.strategy).prepare()
    gc.collect()
    base = rss("VmRSS")
    torch.manual_seed(0)
    model = cls._from_config(config)  # as from_pretrained builds a base: under ZeRO-3, partitioned as it is built
    set_trainable(model, cfg.trainable)
    precision.apply(model, precision.choose(cfg.precision, cfg.strategy))

    class FromFirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: loading and sharding are not counted

    trainer = CritiqueTrainer(model=model, args=args, train_dataset=[{}] * (8 * cfg.global_batch_size),
                              data_collator=lambda _: dict(inputs), callbacks=[FromFirstStep()])
    seen: set[str] = set()  # the saliency maps' dtype where the model cuts them: fp32 under every policy
    if case.get("family") != "qwen2_5_vl":
        from stages.families.internvl.model import IASInternVLModel

        cut = IASInternVLModel.saliency_tiles

        def recording_cut(pixel_values, maps, *rest):  # noqa: ANN001, ANN202
            seen.add(str(maps.dtype).removeprefix("torch."))
            return cut(pixel_values, maps, *rest)

        IASInternVLModel.saliency_tiles = staticmethod(recording_cut)
    trainer.train()
    peak = rss("VmHWM") - base
    (out / f"rank{args.process_index}.json").write_text(json.dumps({"name": case["name"], "peak": peak,
                                                                     "saliency": sorted(seen)}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:  # under torchrun: one case, through the Trainer
        measure_trainer(json.loads(sys.argv[1]), Path(sys.argv[2]))
    else:
        for case in json.loads(sys.argv[1]):
            print(json.dumps(measure(case)), flush=True)
