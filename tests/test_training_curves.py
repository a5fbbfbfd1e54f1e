"""Training curves: a tiny run writes TensorBoard event files under its run folder (the Trainer's own
integration) holding loss, learning rate, grad norm, the cross-attention gates' magnitudes and throughput, read
back with TensorBoard's EventAccumulator: loss and lr equal the Trainer's log history, the gates equal the
final weights' gates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.manifest import load_manifest
from test_finetune_train import _cfg, toy_run  # noqa: F401 (fixture)


def test_tensorboard_events_hold_loss_lr_gates_and_throughput(toy_run: Path) -> None:  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stages.finetune.train import finetune

    summary = finetune(_cfg(run="curves", max_steps=3, cross_attention_lr=5e-2), load_manifest(toy_run))
    events = EventAccumulator(str(summary.run_dir / "tensorboard"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    history = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    history = {h["step"]: h for h in history if "loss" in h}  # the Trainer's own logs, steps 1-3
    assert sorted(history) == [1, 2, 3]
    for tag, key in (("train/loss", "loss"), ("train/learning_rate", "learning_rate"), ("train/grad_norm", "grad_norm")):
        assert scalars[tag] == pytest.approx({s: h[key] for s, h in history.items()}, rel=1e-6), tag

    final = load_file(summary.run_dir / "final" / "model.safetensors")
    gates = [final[k].abs() for k in sorted((k for k in final if ".cross_attention." in k and k.endswith("gate")),
                                            key=_layer)]
    assert len(gates) == len([t for t in scalars if t.startswith("train/gate/layer")]) >= 2
    assert scalars["train/gate/mean_abs"][3] == pytest.approx(sum(g.mean().item() for g in gates) / len(gates), rel=1e-5)
    assert scalars["train/gate/max_abs"][3] == pytest.approx(max(g.max().item() for g in gates), rel=1e-5)
    assert scalars["train/gate/layer00"][3] == pytest.approx(gates[0].mean().item(), rel=1e-5)
    assert scalars["train/gate/mean_abs"][3] > 0  # the zero-initialised gates opened
    for tag in ("train/samples_per_second", "train/tokens_per_second"):  # from the second log on
        assert sorted(scalars[tag]) == [2, 3] and min(scalars[tag].values()) > 0, tag


def _layer(key: str) -> int:
    """Vision layer index of a parameter name (``...layer.3.cross_attention.gate`` -> 3)."""
    return int(next(part for part in reversed(key.split(".cross_attention.")[0].split(".")) if part.isdigit()))
