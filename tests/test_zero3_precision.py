"""Under ZeRO-3 the precision line printed at start says what DeepSpeed really does: checked against the
dtypes of a real bf16 ZeRO-3 training step (DeepSpeed's partitioned weights, its gradient buffer and its fp32
master partitions), one gloo rank on CPU, loading a base checkpoint as real runs do."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_finetune_scale import save_base
from test_report_ranks import free_port
from test_finetune_train import toy_run  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from transformers import TrainerCallback
from pipeline.manifest import load_manifest
from stages.finetune.train import TrainConfig, finetune

class Dtypes(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        zero = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer  # accelerate's wrapper
        params = {n: str(p.ds_tensor.dtype) for n, p in model.named_parameters()}
        print("DTYPES " + json.dumps({
            "trainable": sorted({d for n, d in params.items() if dict(model.named_parameters())[n].requires_grad}),
            "frozen": sorted({d for n, d in params.items() if not dict(model.named_parameters())[n].requires_grad}),
            "gradients": str(zero.grad_partitions_flat_buffer.dtype),
            "master": sorted({str(g.dtype) for g in zero.fp32_partitioned_groups_flat}),
            "adam": sorted({str(v.dtype) for s in zero.optimizer.state.values() for v in s.values() if v.ndim}),
        }), flush=True)

cfg = TrainConfig(dataset="toy", run="z", learning_rate=2e-3, global_batch_size=2, per_device_batch_size=2,
                  max_tiles=2, workers=0, logging_steps=1, save_steps=100, vocab_size=300, max_steps=1,
                  strategy="zero3", precision="bf16", base=sys.argv[2])
finetune(cfg, load_manifest(sys.argv[1]), callbacks=(Dtypes(),))
"""


@pytest.mark.slow
def test_zero3_precision_line_states_deepspeeds_dtypes(toy_run: Path, tmp_path: Path) -> None:  # noqa: F811
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install '.[zero3]')")
    base = save_base(tmp_path / "base", torch.float32)
    script = tmp_path / "zero3_dtypes.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "1", "--master_port",
                           str(free_port()), str(script), str(toy_run), str(base)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("DTYPES "))[7:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("finetune: precision"))
    assert seen["trainable"] == seen["frozen"] == ["torch.bfloat16"], seen
    assert seen["gradients"] == "torch.bfloat16" and seen["master"] == seen["adam"] == ["torch.float32"], seen
    assert "every weight, trainable and frozen, held in bf16" in line, line
    assert "gradients reduced and accumulated in bf16" in line and "fp32 master copies" in line, line
    assert "fp32 AdamW states" in line and "frozen weights fp32" not in line, line
