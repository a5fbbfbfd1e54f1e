"""FSDP2 under the Trainer on 2 gloo ranks (real torchrun, real FSDP): gradients reduced in fp32 on every
micro-batch, and only rank 0 holding the model in host memory while it loads.

Oracles: the dtype of every reduce-scatter torch itself issues (recorded by tests/fsdp_probe.py), the
Trainer's own micro-batch callbacks, the byte size of the model's parameters, and the same run with
``cpu_ram_efficient_loading`` off (every rank loads the whole model, the path before).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_finetune_scale import _assert_same_weights, _final, save_base, toy_run  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _probe(manifest: Path, out: Path, port: int, fsdp: dict | None = None, **config) -> list[dict]:
    """Run tests/fsdp_probe.py on 2 ranks; returns each rank's record."""
    spec = {"manifest": str(manifest), "out": str(out), "fsdp": fsdp, "config": {
        "dataset": "toy", "workers": 0, "max_tiles": 2, "logging_steps": 1, "save_steps": 100, "strategy": "fsdp",
        "learning_rate": 1e-3, **config}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port),
                           str(REPO / "tests" / "fsdp_probe.py"), json.dumps(spec)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _micro_batches(events: list[list[str]]) -> list[list[str]]:
    """Reduce-scatter dtypes issued in each micro-batch (the Trainer ends each with a substep or step event)."""
    batches, current = [], []
    for kind, dtype in events:
        if kind == "reduce":
            current.append(dtype)
        else:
            batches.append(current)
            current = []
    return batches


@pytest.mark.slow
def test_bf16_fsdp_reduces_fp32_gradients_on_every_micro_batch(toy_run: Path, tmp_path: Path) -> None:
    """bf16 autocast, 2 ranks x per-device 1 x 2 accumulation steps: every micro-batch reduce-scatters its
    gradients (none stay unsharded until the last one), always in fp32; the raw saliency maps reach the model's
    saliency cut in fp32 (FSDP's root casts no forward input to bf16 before their min-max normalisation)."""
    base = save_base(tmp_path / "base", torch.float32)
    ranks = _probe(toy_run, tmp_path / "probe", 29551, base=str(base), run="bf16", precision="bf16",
                   global_batch_size=4, per_device_batch_size=1, max_steps=2)
    run_config = json.loads((Path(os.environ["ASE_WORK"]) / "runs/toy/bf16/run_config.json").read_text())
    assert run_config["gradient_accumulation_steps"] == 2 and run_config["precision"] == "bf16"
    for rank in ranks:
        batches = _micro_batches(rank["events"])
        assert len(batches) == 4, rank["events"]  # 2 steps x 2 micro-batches
        assert all(batches), f"a micro-batch kept its gradients unsharded: {batches}"
        assert {d for b in batches for d in b} == {"float32"}, batches
        assert len({len(b) for b in batches}) == 1  # every micro-batch reduces every wrapped group
        assert rank["saliency"] == ["float32"], rank["saliency"]


def _save_heavy_base(directory: Path) -> int:
    """A base whose frozen LLM (8 x 1024 wide, 512 MB in fp32) dwarfs everything else a training step holds;
    returns its parameter bytes in fp32."""
    from transformers import Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    from stages.families.internvl.configs import TINY_CONFIGS
    from stages.families.internvl.model import IASInternVLConfig, IASInternVLForConditionalGeneration
    from stages.families.internvl.tokenizer import IMG_CONTEXT
    from test_finetune_scale import _tokenizer

    tok = _tokenizer()
    vision, text = TINY_CONFIGS["tiny"]
    text = {**text(len(tok)), "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 8}
    config = IASInternVLConfig(vision_config=InternVLVisionConfig(**vision), text_config=Qwen2Config(**text),
                               image_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT), image_seq_length=64,
                               downsample_ratio=0.5)
    torch.manual_seed(0)
    model = IASInternVLForConditionalGeneration(config)
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return 4 * sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_fsdp_loads_the_model_once_in_host_memory(toy_run: Path, tmp_path: Path) -> None:
    """Rank 0 alone reads the weights; rank 1 builds on the meta device and receives its half. Summed over the 2
    ranks, peak host memory until training begins is one copy of the model (rank 0's) plus the two halves, where
    every rank of the path before read a whole copy; both paths train to the same weights."""
    base = tmp_path / "base"
    model_bytes = _save_heavy_base(base)
    runs = Path(os.environ["ASE_WORK"]) / "runs" / "toy"
    config = dict(base=str(base), precision="fp32", trainable=["cross_attention"], global_batch_size=2,
                  per_device_batch_size=1, max_steps=1)
    once = _probe(toy_run, tmp_path / "once", 29552, run="once", **config)
    every = _probe(toy_run, tmp_path / "every", 29553, fsdp={"cpu_ram_efficient_loading": False}, run="every",
                   **config)
    for name, ranks in (("once", once), ("every", every)):
        print(name, "copies of the model, loaded per rank:", [round(r["loaded"] / model_bytes, 2) for r in ranks])
    loaded = [r["loaded"] / model_bytes for r in once]
    before = [r["loaded"] / model_bytes for r in every]
    # rank 0: the whole model + its half; rank 1: its half; both: Python objects, the Trainer, the data
    assert sum(loaded) < 2.4 and loaded[1] < 0.8, loaded
    assert before[1] > 1.0, before  # the oracle: a rank that reads the whole model holds it
    _assert_same_weights(_final(runs / "once"), _final(runs / "every"), 0)
