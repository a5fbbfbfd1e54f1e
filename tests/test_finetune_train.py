"""Stage-2 training: trainable parts, checkpoint completeness, a short run + resume, 2-rank torchrun
(gloo) on disjoint data with identical final weights, and SIGKILL + rerun = an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.manifest import load_manifest
from test_finetune_data import make_manifest, make_store, make_toy

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
FAST = ["--workers", "0", "--lr", "2e-3", "--per-device", "2", "--batch-size", "2", "--max-tiles", "2"]


@pytest.fixture
def toy_run(tmp_path: Path):
    """Toy dataset + manifest + a saliency store for it; returns the manifest path."""
    shas = make_toy(tmp_path)
    path = make_manifest(tmp_path)
    make_store(load_manifest(path), shas)
    return path


def _cfg(**kw):
    from stages.finetune.train import TrainConfig

    base = dict(dataset="toy", run="r", learning_rate=2e-3, global_batch_size=2, per_device_batch_size=2,
                max_tiles=2, workers=0, logging_steps=1, save_steps=4, vocab_size=300)
    return TrainConfig(**{**base, **kw})


def _cli(manifest: Path, *args: str) -> list[str]:
    """``ase-mllm finetune`` on the toy dataset, typed as a user would (``python -m pipeline``)."""
    return [PY, "-m", "pipeline", "--manifest", str(manifest), "finetune", "--dataset", "toy", *FAST, *args]


def test_default_trainable_parts_freeze_only_the_vit_base() -> None:
    from stages.families.fusion import cross_attention_parameters
    from stages.families.internvl.model import build_tiny_model
    from stages.finetune.train import set_trainable

    model = build_tiny_model("tiny", vocab_size=300, image_token_id=5, fusion="cross_attention")
    counts = set_trainable(model, ("cross_attention", "projector", "llm"))
    cross = {n for n, _ in cross_attention_parameters(model)}  # E's own list of the added parameters
    assert cross and counts["cross_attention"] == sum(p.numel() for _, p in cross_attention_parameters(model))
    for name, p in model.named_parameters():
        if name in cross or "multi_modal_projector" in name or "language_model" in name or "lm_head" in name:
            assert p.requires_grad, name
        else:
            assert "vision_tower" in name and not p.requires_grad, name
    assert counts["vision"] == 0 and counts["llm"] > 0 and counts["projector"] > 0


def test_incomplete_checkpoints_are_ignored_and_removed(tmp_path: Path) -> None:
    from stages.finetune.train import last_checkpoint

    for step, state in ((2, "{}"), (4, "{}"), (6, '{"global_st')):  # 6: cut off while writing its state
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "model.safetensors").write_bytes(b"x")
        (ckpt / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-8").mkdir()  # killed before anything was written
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert (tmp_path / "checkpoint-6").exists()
    assert last_checkpoint(tmp_path, remove_incomplete=True) == tmp_path / "checkpoint-4"
    assert not (tmp_path / "checkpoint-6").exists() and not (tmp_path / "checkpoint-8").exists()


def test_sharded_fsdp_checkpoints_count_as_complete_but_are_no_model_to_report(tmp_path: Path) -> None:
    """The FSDP layout (per-rank distributed-checkpoint shards, .metadata written after all of them) resumes
    like any checkpoint; the report refuses it with a one-line hint instead of failing to load a model."""
    import shutil

    from stages.finetune.train import FSDP_SHARDS, last_checkpoint
    from stages.report.generate import find_checkpoint

    # 4: killed while the ranks wrote their shards; 6: rank 0 done, rank 1 killed before its RNG state
    for step, metadata, rng_ranks in ((2, True, 2), (4, False, 0), (6, True, 1)):
        shards = tmp_path / f"checkpoint-{step}" / FSDP_SHARDS
        shards.mkdir(parents=True)
        for r in range(2):
            (shards / f"__{r}_0.distcp").write_bytes(b"x")
        for r in range(rng_ranks):
            (shards.parent / f"rng_state_{r}.pth").write_bytes(b"x")
        if metadata:
            (shards / ".metadata").write_bytes(b"x")
            (shards.parent / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path, remove_incomplete=True) == tmp_path / "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists() and not (tmp_path / "checkpoint-6").exists()
    with pytest.raises(FileNotFoundError, match="FSDP / ZeRO-3 shards.*rerun the same `finetune`"):
        find_checkpoint(tmp_path)

    # the report's ablation rows take a finished run of a condition, never an unfinished FSDP one
    from pipeline.paths import runs_dir
    from stages.report.build import ablation_runs

    runs = runs_dir("toy")
    for run, fusion in (("ias", "cross_attention"), ("none-ddp", "none"), ("none-fsdp", "none")):
        (runs / run).mkdir(parents=True)
        (runs / run / "run_config.json").write_text(json.dumps({"fusion": fusion}))
    (runs / "ias" / "final").mkdir()
    (runs / "ias" / "final" / "config.json").write_text("{}")
    (runs / "none-ddp" / "checkpoint-4").mkdir()
    (runs / "none-ddp" / "checkpoint-4" / "model.safetensors").write_bytes(b"x")
    (runs / "none-ddp" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    shutil.copytree(tmp_path / "checkpoint-2", runs / "none-fsdp" / "checkpoint-2")  # newer, unfinished
    assert ablation_runs("toy", "ias")[(True, False)] == "none-ddp"
    shutil.rmtree(runs / "none-ddp")
    assert (True, False) not in ablation_runs("toy", "ias")


def test_finetune_learns_saves_and_resumes(toy_run: Path) -> None:
    import shutil

    from stages.finetune.train import finetune

    manifest = load_manifest(toy_run)
    first = finetune(_cfg(max_steps=10), manifest)
    run = first.run_dir
    assert first.global_step == 10 and first.resumed_from is None
    assert first.end_loss < first.start_loss
    assert (run / "checkpoint-10" / "model.safetensors").exists() and (run / "final" / "model.safetensors").exists()
    assert (run / "tokenizer" / "tokenizer.json").exists()
    assert json.loads((run / "run_config.json").read_text())["learning_rate"] == 2e-3
    assert sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line) == 10
    uninterrupted = load_file(run / "final" / "model.safetensors")
    # as if it had died after step 8: the last checkpoint half-written, no final weights
    shutil.rmtree(run / "final")
    (run / "checkpoint-10" / "trainer_state.json").unlink()
    second = finetune(_cfg(max_steps=10), manifest)
    assert second.resumed_from == run / "checkpoint-8" and second.global_step == 10
    resumed = load_file(run / "final" / "model.safetensors")
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=1e-4, atol=1e-6, msg=k)
    # rerunning a completed run that ended mid-epoch (5 steps an epoch) trains nothing more
    done = finetune(_cfg(run="mid", max_steps=7, save_steps=7), manifest)
    before = load_file(done.run_dir / "final" / "model.safetensors")
    again = finetune(_cfg(run="mid", max_steps=7, save_steps=7), manifest)
    assert again.global_step == 7 and not (done.run_dir / "checkpoint-8").exists()
    after = load_file(done.run_dir / "final" / "model.safetensors")
    assert all(torch.equal(after[k], before[k]) for k in before)
    # killed inside save_final between its two renames: final/ moved aside, the complete temp dir not yet in place
    final = done.run_dir / "final"
    shutil.copytree(final, final.with_name(".final.tmp"))
    final.replace(final.with_name(".final.old"))
    again = finetune(_cfg(run="mid", max_steps=7, save_steps=7), manifest)
    assert again.global_step == 7 and not (done.run_dir / "checkpoint-8").exists()
    assert not final.with_name(".final.old").exists() and not final.with_name(".final.tmp").exists()
    after = load_file(final / "model.safetensors")
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.slow
def test_torchrun_two_ranks_disjoint_data_identical_weights(toy_run: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import sys, torch
from safetensors.torch import save_file
from transformers import TrainerCallback
sys.path.insert(0, {str(REPO)!r})
from pipeline.manifest import load_manifest
from stages.finetune.train import TrainConfig, finetune

class Dump(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kw):
        sd = {{k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}}
        save_file(sd, {str(tmp_path)!r} + f"/weights-rank{{args.process_index}}.safetensors")

cfg = TrainConfig(dataset="toy", run="ddp", learning_rate=2e-3, global_batch_size=4, per_device_batch_size=2,
                  max_tiles=2, workers=0, logging_steps=1, save_steps=100, vocab_size=300, max_steps=2,
                  log_sample_ids=True)
finetune(cfg, load_manifest({str(toy_run)!r}), callbacks=(Dump(),))
""")
    torchrun = Path(PY).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29531", str(script)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples = Path(os.environ["ASE_WORK"]) / "runs" / "toy" / "ddp" / "samples"
    ranks = [[int(i) for i in (samples / f"rank{r}.txt").read_text().split()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 2 steps x per-device batch 2
    assert not set(ranks[0]) & set(ranks[1])
    w0, w1 = (load_file(tmp_path / f"weights-rank{r}.safetensors") for r in (0, 1))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    state = json.loads((samples.parent / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def _global_step(run: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")]
    return json.loads((run / f"checkpoint-{max(steps)}" / "trainer_state.json").read_text())["global_step"]


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(toy_run: Path) -> None:
    runs = Path(os.environ["ASE_WORK"]) / "runs" / "toy"
    args = ["--max-steps", "18", "--save-steps", "3", "--logging-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(toy_run, "--run", "killed", *args), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = runs / "killed" / "checkpoint-3" / "trainer_state.json"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (runs / "killed" / "final").exists()
    killed_at = _global_step(runs / "killed")
    assert 3 <= killed_at < 18
    rerun = subprocess.run(_cli(toy_run, "--run", "killed", *args), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from checkpoint-" in rerun.stdout
    whole = subprocess.run(_cli(toy_run, "--run", "whole", *args), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=240)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert _global_step(runs / "killed") == _global_step(runs / "whole") == 18
    a = load_file(runs / "killed" / "final" / "model.safetensors")
    b = load_file(runs / "whole" / "final" / "model.safetensors")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_lora_trains_adapters_only_and_resumes_exactly(toy_run: Path) -> None:
    import shutil

    from stages.finetune.train import finetune

    manifest = load_manifest(toy_run)
    cfg = dict(run="lora", lora=True, max_steps=3, save_steps=2)
    first = finetune(_cfg(**cfg), manifest)
    saved = load_file(first.run_dir / "final" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and any("cross_attention.gate" in k for k in saved)
    assert not any("vision_tower.encoder.layer.0.attention." in k for k in saved)  # frozen ViT base not saved
    shutil.rmtree(first.run_dir / "checkpoint-3")
    shutil.rmtree(first.run_dir / "final")
    second = finetune(_cfg(**cfg), manifest)
    assert second.resumed_from == first.run_dir / "checkpoint-2"
    again = load_file(first.run_dir / "final" / "adapter_model.safetensors")
    for k in saved:
        torch.testing.assert_close(again[k], saved[k], rtol=1e-4, atol=1e-6, msg=k)


def test_cross_attention_lr_gets_its_own_groups_and_moves_the_gates_faster(toy_run: Path) -> None:
    """--cross-attention-lr: exactly the cross-attention parameters train at their own peak lr (weight decay
    kept), the rest at --lr; in a real run the zero-initialised gates then move far more."""
    from stages.families.internvl.model import build_tiny_model
    from stages.finetune.train import finetune, own_lr_for_cross_attention, part_of

    model = build_tiny_model("tiny", vocab_size=300, image_token_id=299)
    named = dict(model.named_parameters())
    decay = [p for n, p in named.items() if p.ndim > 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": [p for p in named.values() if p.ndim <= 1], "weight_decay": 0.0}],
                                  lr=1e-4)
    moved = own_lr_for_cross_attention(optimizer, model, 1e-2)
    cross = {n for n in named if part_of(n) == "cross_attention"}
    assert moved == len(cross) > 0
    by_id = {id(p): n for n, p in named.items()}
    for group in optimizer.param_groups:
        names = {by_id[id(p)] for p in group["params"]}
        assert names <= cross if group["lr"] == 1e-2 else not names & cross
        assert group["weight_decay"] == (0.01 if all(named[n].ndim > 1 for n in names) else 0.0)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named)

    manifest = load_manifest(toy_run)
    gates = {}
    for run, lr in (("same", None), ("fast", 0.1)):
        result = finetune(_cfg(run=run, max_steps=3, cross_attention_lr=lr), manifest)
        weights = load_file(result.run_dir / "final" / "model.safetensors")
        gates[run] = max(weights[k].abs().max().item() for k in weights if k.endswith("cross_attention.gate"))
    assert gates["fast"] > 10 * gates["same"] > 0, gates
