"""Stage 2 at the paper's scale, on CPU: precision policy, gradient checkpointing with a frozen ViT,
sequence length from the data (40 tiles), the memory plan against measured peak memory (fp32 steps, and bf16
steps under DDP, FSDP and ZeRO-3 on 2 gloo ranks).

Oracles: a hand-written fp32 AdamW step (torch.optim.AdamW on an fp32 copy of the same weights and
batch), the same model's gradients without checkpointing, every example's own encoded length, the
published parameter counts of InternVL2-8B, and peak resident memory of real training steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from pipeline.manifest import load_manifest
from pipeline.paths import dataset_dir
from storage.atomic import write_json_atomic, write_parquet_atomic
from storage.images import sha256_file
from storage.tables import COMMENTS_SCHEMA, IMAGES_SCHEMA
from test_finetune_data import SIZES, WORDS, make_manifest, make_store, make_toy

REPO = Path(__file__).resolve().parents[1]
TRAINABLE = ("cross_attention", "projector", "llm")


@pytest.fixture
def toy_run(tmp_path: Path) -> Path:
    shas = make_toy(tmp_path)
    path = make_manifest(tmp_path)
    make_store(load_manifest(path), shas)
    return path


def _tokenizer():
    from stages.families.internvl.tokenizer import train_bpe

    return train_bpe([f"{a} and {b}." for a in WORDS for b in WORDS], vocab_size=300)


def save_base(directory: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """A tiny InternVL-style base checkpoint (weights in ``dtype``) with its tokenizer."""
    from stages.families.internvl.model import build_tiny_model
    from stages.families.internvl.tokenizer import IMG_CONTEXT

    tok = _tokenizer()
    torch.manual_seed(seed)
    model = build_tiny_model("tiny", vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT))
    model.to(dtype).save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


# ---------------------------------------------------------------- precision


def test_precision_policy_per_machine() -> None:
    from stages.finetune.precision import choose

    assert choose(cuda=True, bf16_supported=True).compute == "bf16"  # A100 / H100
    assert choose(cuda=True, bf16_supported=False).compute == "fp16"  # V100, T4: fp16 + loss scaling
    assert choose(cuda=False, bf16_supported=False).compute == "fp32"
    assert choose(cuda=True, bf16_supported=True).frozen == "bf16"  # DDP: frozen weights in the compute dtype
    assert choose(strategy="fsdp", cuda=True, bf16_supported=True).frozen == "fp32"  # FSDP2: one dtype per group
    assert choose("fp16", cuda=True, bf16_supported=True).trainer_flags == {"bf16": False, "fp16": True}
    with pytest.raises(ValueError, match="needs a GPU"):
        choose("fp16", cuda=False)


def test_bf16_base_first_step_moves_weights_like_fp32_adamw(toy_run: Path, tmp_path: Path) -> None:
    """One step at the paper's lr 4e-5 from a bf16-saved base must move every trainable weight as
    torch's AdamW does in fp32 on the same batch. AdamW's first step moves a weight by about lr (4e-5);
    bf16 master weights resolve only 2^-8 of a weight (~1e-4 at 0.02), so most updates would vanish.
    Tolerance 1e-6 (2.5 % of one update): fp32 rounding of the weights (<= 5e-7 for |w| <= 4) and
    float noise in the gradients; a lost or bf16-rounded update is off by 4e-5 or more."""
    from stages.families.internvl.collate import Collator
    from stages.families.internvl.dataset import CritiqueDataset, TileSpec
    from stages.families.internvl.model import IASInternVLForConditionalGeneration, tile_size, tokens_per_tile
    from stages.finetune.train import TrainConfig, finetune, set_trainable
    from stages.families.internvl.tokenizer import load_tokenizer
    from storage.saliency_store import find_store

    base = save_base(tmp_path / "base", torch.bfloat16)
    manifest = load_manifest(toy_run)
    cfg = TrainConfig(dataset="toy", run="bf16", base=str(base), learning_rate=4e-5, weight_decay=0.0,
                      warmup_ratio=0.0, global_batch_size=2, per_device_batch_size=2, max_tiles=2, workers=0,
                      max_steps=1, save_steps=100, logging_steps=1, log_sample_ids=True)
    summary = finetune(cfg, manifest)
    trained = load_file(summary.run_dir / "final" / "model.safetensors")
    ids = [int(i) for i in (summary.run_dir / "samples" / "rank0.txt").read_text().split()]
    assert len(ids) == 2

    # the reference: fp32 copy of the bf16 weights (exact), the same two examples, torch AdamW
    ref = IASInternVLForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32)
    set_trainable(ref, TRAINABLE)
    tok = load_tokenizer(base)
    tiles = TileSpec(tile_size=tile_size(ref.config), max_tiles=2, tokens_per_tile=tokens_per_tile(ref.config))
    data = CritiqueDataset("toy", "train", tok, tiles, find_store(manifest)[0])
    batch = Collator(tok.pad_token_id)([data[i] for i in ids])
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    params = [p for p in ref.parameters() if p.requires_grad]
    ref(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)  # the Trainer's max_grad_norm
    torch.optim.AdamW(params, lr=4e-5, weight_decay=0.0).step()

    assert {v.dtype for v in trained.values() if v.is_floating_point()} == {torch.float32}  # fp32 master weights
    after = dict(IASInternVLForConditionalGeneration.from_pretrained(str(summary.run_dir / "final"),
                                                                     dtype=torch.float32).named_parameters())
    checked = 0
    for name, p in ref.named_parameters():
        if p.requires_grad:
            moved, expected = after[name].detach() - start[name], p.detach() - start[name]
            torch.testing.assert_close(moved, expected, rtol=0, atol=1e-6, msg=name)
            checked += p.numel()
    assert checked > 100_000


def test_bf16_autocast_policy_trains_with_frozen_matrices_in_bf16(toy_run: Path, capsys: pytest.CaptureFixture) -> None:
    """The GPU policy (bf16 autocast, frozen weight matrices stored in bf16) on CPU's bf16 autocast,
    with gradient checkpointing: it trains, saves fp32 trainable + bf16 frozen weights, and reloads."""
    import math

    from stages.finetune.train import TrainConfig, finetune
    from stages.report.generate import load_run

    cfg = TrainConfig(dataset="toy", run="bf16", precision="bf16", gradient_checkpointing=True, learning_rate=2e-3,
                      global_batch_size=2, per_device_batch_size=2, max_tiles=2, workers=0, max_steps=3,
                      save_steps=2, logging_steps=1, vocab_size=300)
    summary = finetune(cfg, load_manifest(toy_run))
    assert "compute bf16 autocast; frozen weights bf16" in capsys.readouterr().out
    assert math.isfinite(summary.end_loss) and summary.global_step == 3
    saved = load_file(summary.run_dir / "final" / "model.safetensors")
    frozen = saved["vision_tower.encoder.layer.0.attention.q_proj.weight"]
    assert frozen.dtype == torch.bfloat16
    assert saved["vision_tower.encoder.layer.0.cross_attention.q_proj.weight"].dtype == torch.float32
    assert saved["vision_tower.encoder.layer.0.layernorm_before.weight"].dtype == torch.float32
    captioner, _, _ = load_run("toy", "bf16")
    assert captioner.model is not None


# ---------------------------------------------------------------- gradient checkpointing


def _open_gates(model) -> None:
    from stages.families.fusion import cross_attention_parameters

    with torch.no_grad():
        for name, p in cross_attention_parameters(model):
            if name.endswith(".gate"):
                p.fill_(0.5)


def _grads(model, batch) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_with_frozen_vit_keeps_cross_attention_gradients() -> None:
    """Frozen ViT + checkpointing: no input of a vision layer requires grad. Reentrant checkpointing
    then silently drops the gradients of the trainable cross-attention inside those layers unless
    something forces the embeddings' outputs to require grad (transformers' input hooks do, for the
    models it knows). The training arguments pin non-reentrant checkpointing, which needs no hook:
    its gradients equal the model's without checkpointing, hooks or not."""
    from stages.families.internvl.model import build_tiny_model
    from stages.finetune.sharding import strategy
    from stages.finetune.train import set_trainable
    from test_model_assembly import _batch

    torch.manual_seed(0)
    model = build_tiny_model("tiny", vocab_size=1000, image_token_id=999)
    set_trainable(model, TRAINABLE)
    _open_gates(model)
    model.train()
    batch = _batch(model)
    batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == 999, -100)
    plain = _grads(model, batch)
    cross = [n for n in plain if ".cross_attention." in n]
    assert cross and all(plain[n] is not None and plain[n].abs().sum() > 0 for n in cross)

    kwargs = strategy("ddp").training_kwargs(model.config, gradient_checkpointing=True)
    assert kwargs["activation_checkpointing"] and kwargs["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    model.activation_checkpointing_enable(kwargs["activation_checkpointing_kwargs"])
    assert all(layer.gradient_checkpointing for layer in model.model.vision_tower.encoder.layer)
    model.disable_input_require_grads()  # no help from input hooks
    checkpointed = _grads(model, batch)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-4, atol=1e-6, msg=name)

    # the trap itself: reentrant checkpointing without input hooks loses every cross-attention gradient
    model.activation_checkpointing_disable()
    model.activation_checkpointing_enable({"use_reentrant": True})
    model.disable_input_require_grads()
    reentrant = _grads(model, batch)
    assert all(reentrant[n] is None or reentrant[n].abs().sum() == 0 for n in cross)


# ---------------------------------------------------------------- sequence length, 40 tiles


def test_max_length_comes_from_the_data_and_a_cap_truncates_and_counts(toy_run: Path) -> None:
    from stages.families.data import SequenceLengthError
    from stages.families.internvl.dataset import CritiqueDataset, TileSpec
    from stages.families.internvl.prompting import encode_example
    from stages.families.internvl.tiling import plan_tiles
    from storage.saliency_store import find_store

    tok = _tokenizer()
    tiles = TileSpec(tile_size=224, max_tiles=4, tokens_per_tile=64)
    store = find_store(load_manifest(toy_run))[0]
    data = CritiqueDataset("toy", "train", tok, tiles, store)
    lengths = [len(data[i]["input_ids"]) for i in range(len(data))]  # each example's own encoding, uncut
    assert data.max_length == max(lengths) and data.truncated == 0
    assert all(data[i]["labels"][-1] == tok.eos_token_id for i in range(len(data)))

    cap = max(lengths) - 3
    capped = CritiqueDataset("toy", "train", tok, tiles, store, max_length=cap)
    assert capped.max_length == cap and capped.truncated == sum(n > cap for n in lengths) > 0
    loader = DataLoader(capped, batch_size=2, num_workers=2, collate_fn=lambda xs: xs)  # real worker processes
    seen = [len(x["input_ids"]) for batch in loader for x in batch]
    assert len(seen) == len(lengths) and max(seen) == cap

    # the largest image's tiles x 64 context tokens + the prompt + one critique token + eos must fit
    most = max(plan_tiles(w, h, 224, 1, 4).num_tiles for w, h in SIZES[:-1])  # the train images
    smallest_cap = len(encode_example(tok, most * 64, "").input_ids) + 1  # prompt + eos (+ 1 critique token)
    CritiqueDataset("toy", "train", tok, tiles, store, max_length=smallest_cap)
    with pytest.raises(SequenceLengthError, match="--max-length"):
        CritiqueDataset("toy", "train", tok, tiles, store, max_length=smallest_cap - 1)


def _forty_tile_dataset(tmp: Path) -> list[str]:
    """A dataset whose first image is 1792 x 1120 (8 x 5 tiles of 224 px: 40 tiles + thumbnail)."""
    root = tmp / "big_images"
    root.mkdir()
    rows, comments, shas = [], [], []
    for i, (w, h) in enumerate([(1792, 1120), (300, 200)]):
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
        pixels = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"b{i}.png")
        sha = sha256_file(root / f"b{i}.png")
        shas.append(sha)
        rows.append({"image_id": f"b{i}", "split": "train", "path": f"b{i}.png", "width": w, "height": h,
                     "sha256": sha, "score": None})
        comments.append({"image_id": f"b{i}", "comment_id": "c0", "text": f"{WORDS[i]} and {WORDS[i + 2]}.",
                         "aspect": None})
    out = dataset_dir("big")
    write_parquet_atomic(out / "images.parquet", pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA))
    write_parquet_atomic(out / "comments.parquet", pa.Table.from_pylist(comments, schema=COMMENTS_SCHEMA))
    write_json_atomic(out / "meta.json", {"root": str(root), "format": "folder"})
    return shas


def test_forty_tiles_train_and_generate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from stages.families.internvl.tiling import plan_tiles
    from stages.finetune.train import TrainConfig, finetune
    from stages.report.generate import load_run

    shas = _forty_tile_dataset(tmp_path)
    assert plan_tiles(1792, 1120, 224, 1, 40).num_tiles == 41
    manifest_path = make_manifest(tmp_path, "big")
    make_store(load_manifest(manifest_path), shas)
    cfg = TrainConfig(dataset="big", run="t40", max_tiles=40, learning_rate=2e-3, global_batch_size=2,
                      per_device_batch_size=2, workers=0, max_steps=2, save_steps=100, logging_steps=1, vocab_size=300)
    summary = finetune(cfg, load_manifest(manifest_path))
    out = capsys.readouterr().out
    assert summary.global_step == 2 and summary.truncated == 0
    assert summary.max_length > 41 * 64  # 41 tiles x 64 tokens + prompt + critique
    assert "plan: ddp x1, 40 tiles" in out and "finetune: precision on cpu" in out

    captioner, _, _ = load_run("big", "t40")
    assert captioner.spec.max_tiles == 40
    img = Image.open(tmp_path / "big_images" / "b0.png")
    prompt = captioner.prepare(img, np.random.default_rng(0).random((14, 14)))
    assert prompt.pixel_values.shape[0] == 41
    assert sum(i == captioner.model.config.image_token_id for i in prompt.input_ids) == 41 * 64
    (text,) = captioner.generate([prompt])
    assert isinstance(text, str)


# ---------------------------------------------------------------- the memory plan


def test_plan_reads_only_a_config_and_counts_the_real_bases(tmp_path: Path) -> None:
    from stages.families.internvl.model import named_config
    from stages.finetune.plan import Setting, load_model_config, plan

    # InternVL2-8B as published: InternViT-300M (304 M) + MLP projector + InternLM2.5-7B (7.74 B) = 8.08 B
    cfg = named_config("internvl2-8b")
    llm = 2 * 92553 * 4096 + 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096
    p = plan(cfg, Setting(max_tiles=40, gpus=8, strategy="fsdp"), gpu_memory_gb=80)
    assert p.counts.by_part["llm"] == llm
    assert 300e6 < p.counts.by_part["vision"] < 310e6
    assert p.counts.by_part["projector"] == 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 4096 + 4096
    assert p.seq == 41 * 256 + 256
    # full fine-tuning of 8B: FSDP over 8 x 80 GB fits, plain DDP does not (fp32 AdamW alone is ~63 GB)
    assert p.max_batch >= 1
    assert plan(cfg, Setting(max_tiles=40, gpus=8, strategy="ddp"), gpu_memory_gb=80).max_batch == 0
    # checkpointing is what makes 40 tiles fit
    off = plan(cfg, Setting(max_tiles=40, gpus=8, strategy="fsdp", gradient_checkpointing=False), gpu_memory_gb=80)
    assert off.activations_per_sample > 5 * p.activations_per_sample and off.max_batch == 0
    # a config.json alone (no weights) is enough
    cfg.save_pretrained(tmp_path / "cfg")
    assert not list((tmp_path / "cfg").glob("*.safetensors"))
    again = plan(load_model_config(tmp_path / "cfg" / "config.json"), Setting(max_tiles=40, gpus=8, strategy="fsdp"))
    assert again.counts.total == p.counts.total
    assert named_config("internvl3-8b").text_config.num_hidden_layers == 28


V_SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, image_size=224,
               patch_size=14)
T_SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=8000, tie_word_embeddings=False)
V_LLM = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, image_size=224,
             patch_size=14)
T_LLM = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=16000, tie_word_embeddings=False)
MEMORY_CASES = [  # vision-heavy, the same with checkpointing, LLM-heavy
    dict(name="vision-heavy", vision=V_SMALL, text=T_SMALL, tiles=7, per_device=2, text_tokens=96,
         labelled_tokens=64, trainable=list(TRAINABLE), gradient_checkpointing=False),
    dict(name="vision-heavy-checkpointed", vision=V_SMALL, text=T_SMALL, tiles=7, per_device=2, text_tokens=96,
         labelled_tokens=64, trainable=list(TRAINABLE), gradient_checkpointing=True),
    dict(name="llm-heavy", vision=V_LLM, text=T_LLM, tiles=3, per_device=1, text_tokens=512, labelled_tokens=400,
         trainable=list(TRAINABLE), gradient_checkpointing=False),
]


@pytest.mark.slow
def test_plan_is_within_10_percent_of_measured_peak_memory() -> None:
    """Peak resident memory of two real fp32 training steps on CPU (tests/memory_probe.py) vs the plan."""
    from memory_probe import build
    from stages.finetune.plan import Setting, plan

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "memory_probe.py"), json.dumps(MEMORY_CASES)],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = [json.loads(line) for line in proc.stdout.splitlines()]
    ratios = {}
    for case, m in zip(MEMORY_CASES, measured):
        config, _ = build(case)
        setting = Setting(max_tiles=case["tiles"] - 1, per_device=case["per_device"], strategy="ddp",
                          gradient_checkpointing=case["gradient_checkpointing"], trainable=TRAINABLE,
                          text_tokens=case["text_tokens"], labelled_tokens=case["labelled_tokens"], compute="fp32")
        ratios[case["name"]] = plan(config, setting).total / m["peak"]
    assert all(0.9 <= r <= 1.1 for r in ratios.values()), ratios


BF16_CASES = [  # the LLM-heavy shape, bf16 autocast, 2 gloo ranks, through the Trainer; FSDP with 2 accumulation steps
    dict(name=strategy, vision=V_LLM, text=T_LLM, tiles=3, per_device=1, text_tokens=512, labelled_tokens=400,
         trainable=list(TRAINABLE), gradient_checkpointing=False, strategy=strategy, compute="bf16",
         accumulation=2 if strategy == "fsdp" else 1)
    for strategy in ("ddp", "fsdp", "zero3")
]


@pytest.mark.slow
@pytest.mark.parametrize("case", BF16_CASES, ids=[c["name"] for c in BF16_CASES])
def test_plan_is_within_10_percent_of_measured_bf16_sharded_peak_memory(case: dict, tmp_path: Path) -> None:
    """Peak resident memory per rank of 2 real bf16-autocast Trainer steps on 2 gloo ranks (tests/memory_probe.py:
    the engine's own sharding, precision and gradient reduction) vs the plan of the same setting."""
    from memory_probe import build
    from stages.finetune.plan import Setting, plan

    if case["strategy"] == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install '.[zero3]')")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    import socket

    with socket.socket() as sock:  # a free port: fixed ones collide with other runs of the suite on the machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port),
                           str(REPO / "tests" / "memory_probe.py"), json.dumps(case), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config, _ = build(case)
    setting = Setting(max_tiles=case["tiles"] - 1, per_device=case["per_device"], gpus=2, strategy=case["strategy"],
                      gradient_checkpointing=case["gradient_checkpointing"], trainable=TRAINABLE,
                      text_tokens=case["text_tokens"], labelled_tokens=case["labelled_tokens"], compute="bf16",
                      accumulation=case["accumulation"])
    planned = plan(config, setting).total
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ratios = [planned / rank["peak"] for rank in ranks]
    assert all(0.9 <= r <= 1.1 for r in ratios), ratios
    assert all(rank["saliency"] == ["float32"] for rank in ranks), ranks  # raw maps reach the cut in fp32


# ---------------------------------------------------------------- sharded training (2 gloo processes)


def _launch(manifest: Path, run: str, base: Path, *args: str, ranks: int = 1) -> list[str]:
    """``ase-mllm finetune`` typed as a user would: ``python -m pipeline ...``, or under ``torchrun`` when
    ``ranks`` > 1, on a free port (fixed ports collide with other test runs on the same machine)."""
    import socket

    argv = ["-m", "pipeline", "--manifest", str(manifest), "finetune", "--dataset", "toy", "--run-name", run,
            "--base", str(base), "--workers", "0", "--lr", "1e-3", "--batch-size", "4", "--per-device", "2",
            "--max-tiles", "2", "--logging-steps", "1", *args]
    if ranks == 1:
        return [sys.executable, *argv]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(ranks), "--master_port",
            str(port), *argv]


def _final(run: Path) -> dict[str, torch.Tensor]:
    """The run's final weights as the report stage loads them (each engine writes its own key layout)."""
    from stages.families.internvl.model import IASInternVLForConditionalGeneration

    model, info = IASInternVLForConditionalGeneration.from_pretrained(str(run / "final"), dtype=torch.float32,
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return {k: v.detach() for k, v in model.named_parameters()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


SHARDED_ATOL = 2e-5  # 2 AdamW steps at lr 1e-3 move a weight ~2e-3; reduction order changes only float noise


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_two_ranks_equal_one_process(strategy: str, toy_run: Path, tmp_path: Path) -> None:
    """2 gloo ranks x per-device 2 vs one process x 2 accumulation steps: the same 4 examples per
    step, so the weights after 2 steps agree up to reduction-order noise. ZeRO-3 saves after every step: its
    checkpoints hold the engine's per-rank shards and no gathered model, and a rerun that lost checkpoint-2 and
    final/ resumes from checkpoint-1's shards to the same weights."""
    import shutil

    if strategy == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install '.[zero3]')")
    base = save_base(tmp_path / "base", torch.float32)
    runs = Path(os.environ["ASE_WORK"]) / "runs" / "toy"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = ["--max-steps", "2", "--log-sample-ids"]  # 2 full steps of the 10-pair epoch
    saves = ["--save-steps", "1" if strategy == "zero3" else "100"]
    for run, ranks, extra in (("single", 1, ["--save-steps", "100"]), (strategy, 2, ["--strategy", strategy, *saves])):
        proc = subprocess.run(_launch(toy_run, run, base, *steps, *extra, ranks=ranks), cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    def micro_batches(run: str, rank: int) -> list[list[int]]:
        return [[int(i) for i in line.split()] for line in (runs / run / "samples" / f"rank{rank}.txt").read_text().splitlines()]

    single, rank0, rank1 = micro_batches("single", 0), micro_batches(strategy, 0), micro_batches(strategy, 1)
    for step in range(2):  # the same four examples make up each optimizer step
        assert sorted(single[2 * step] + single[2 * step + 1]) == sorted(rank0[step] + rank1[step])
    _assert_same_weights(_final(runs / strategy), _final(runs / "single"), SHARDED_ATOL)
    assert json.loads((runs / strategy / "run_config.json").read_text())["strategy"] == strategy
    if strategy == "zero3":
        for ckpt in (runs / "zero3" / "checkpoint-1", runs / "zero3" / "checkpoint-2"):
            _assert_zero3_checkpoint(ckpt, ranks=2)
        first = _final(runs / "zero3")
        shutil.rmtree(runs / "zero3" / "checkpoint-2")
        shutil.rmtree(runs / "zero3" / "final")
        proc = subprocess.run(_launch(toy_run, "zero3", base, *steps, "--strategy", "zero3", *saves, ranks=2),
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "resumed from checkpoint-1" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
        _assert_same_weights(_final(runs / "zero3"), first, 1e-6)


def _assert_zero3_checkpoint(ckpt: Path, ranks: int) -> None:
    """DeepSpeed's layout alone: every rank's model and optimizer shard, no gathered model anywhere in it."""
    from stages.finetune.train import is_complete, is_sharded

    tag = (ckpt / "latest").read_text().strip()
    assert sorted(p.name for p in (ckpt / tag).glob("*_model_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(ranks)]
    assert len(list((ckpt / tag).glob("*_optim_states.pt"))) == ranks
    full = [p.name for p in ckpt.glob("*") if p.suffix in (".safetensors", ".bin")]
    assert not full, full
    assert is_complete(ckpt) and is_sharded(ckpt)


@pytest.mark.slow
def test_fsdp_sigkill_then_rerun_equals_uninterrupted(toy_run: Path, tmp_path: Path) -> None:
    import signal
    import time

    base = save_base(tmp_path / "base", torch.float32)
    runs = Path(os.environ["ASE_WORK"]) / "runs" / "toy"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--strategy", "fsdp", "--gradient-checkpointing", "--max-steps", "6", "--save-steps", "2"]
    proc = subprocess.Popen(_launch(toy_run, "killed", base, *args, ranks=2), cwd=REPO,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = runs / "killed" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (runs / "killed" / "final").exists(), "the run ended before it could be killed"
    for run in ("killed", "whole"):
        done = subprocess.run(_launch(toy_run, run, base, *args, ranks=2), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if run == "killed":
            assert "resumed from checkpoint-" in done.stdout
    _assert_same_weights(_final(runs / "killed"), _final(runs / "whole"), 1e-6)
    for run in ("killed", "whole"):  # sharded intermediate checkpoints; the one full model is final/'s
        assert sorted(p.name for p in (runs / run).glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
        _assert_sharded_checkpoint(runs / run / "checkpoint-6", ranks=2)
        assert (runs / run / "final" / "model.safetensors").exists()


def _assert_sharded_checkpoint(ckpt: Path, ranks: int) -> None:
    """A distributed-checkpoint layout: model and optimizer state written by every rank (one shard file each),
    no full model (safetensors or gathered FSDP .bin) anywhere in it."""
    from stages.finetune.train import is_complete

    for state in ("pytorch_model_fsdp_0", "optimizer_0"):
        shards = sorted(p.name for p in (ckpt / state).glob("*.distcp"))
        assert shards == [f"__{r}_0.distcp" for r in range(ranks)], (state, shards)
        assert (ckpt / state / ".metadata").exists()
    full = [p.name for p in ckpt.rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert not full, full
    assert is_complete(ckpt)


@pytest.mark.slow
def test_fsdp_lora_checkpoint_is_sharded_and_resumes_exactly(toy_run: Path, tmp_path: Path) -> None:
    """LoRA under FSDP: checkpoint-2 is sharded; a rerun after losing checkpoint-3 and final/ (as a kill
    right after checkpoint-2) resumes from checkpoint-2 and ends with the uninterrupted run's adapter weights."""
    import shutil

    base = save_base(tmp_path / "base", torch.float32)
    run = Path(os.environ["ASE_WORK"]) / "runs" / "toy" / "lora"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--strategy", "fsdp", "--lora", "--max-steps", "3", "--save-steps", "2"]
    outputs = []
    for attempt in range(2):
        proc = subprocess.run(_launch(toy_run, "lora", base, *args, ranks=2),
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outputs.append(load_file(run / "final" / "adapter_model.safetensors"))
        if attempt == 0:
            _assert_sharded_checkpoint(run / "checkpoint-2", ranks=2)
            assert any(".lora_A." in k for k in outputs[0]) and any("cross_attention.gate" in k for k in outputs[0])
            shutil.rmtree(run / "checkpoint-3")
            shutil.rmtree(run / "final")
    assert "resumed from checkpoint-2" in proc.stdout
    _assert_same_weights(outputs[1], outputs[0], 1e-6)


def test_zero3_config_is_accepted_by_deepspeed_and_the_trainer() -> None:
    """configs/zero3.yaml parses (DeepSpeed's own config model) and the Trainer fills its "auto" values."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install '.[zero3]')")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from stages.finetune.sharding import strategy

    settings = strategy("zero3").config()
    zero = DeepSpeedZeroConfig(**settings["zero_optimization"])
    assert zero.stage == 3 and not zero.gather_16bit_weights_on_model_save  # checkpoints hold the engine's shards
    hf = HfTrainerDeepSpeedConfig(settings)
    assert hf.is_zero3() and hf.get_value("zero_optimization.stage3_max_live_parameters") == 1e9
