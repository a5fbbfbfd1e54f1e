"""A training step reads nothing back from the device (on a GPU every such read waits for the queued kernels).

Every tensor operation of the Trainer's ``training_step`` (the batch's move, forward, loss, backward: what runs
once per micro-batch) passes through a torch function mode that records the calls that read a value back to the
host: ``.item()``, ``.tolist()``, ``nonzero`` and indexing with a boolean mask (which is ``nonzero`` underneath),
and a tensor's truth value or conversion to a Python number. The oracle that the mode sees them: the same step
through the model's fallback path, which builds its loss index from ``labels`` on the host.

One read is transformers' own and stays: building the LLM's causal mask, it asks whether the position ids hold
packed sequences (or, given an attention mask, whether it holds padding): one boolean per forward. It is listed in
:data:`TRANSFORMERS_OWN` and allowed; every other read fails the test.
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline.manifest import load_manifest
from test_finetune_data import make_manifest, make_store, make_toy

TRANSFORMERS_OWN = {("__bool__", "find_packed_sequence_indices")}  # masking_utils: packed sequences in the batch?
READS = {"item", "tolist", "nonzero", "argwhere", "masked_select", "__bool__", "__int__", "__float__", "__index__"}


def _boolean_index(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostReads(TorchFunctionMode):
    """Records (call, where) for every read back to the host made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = getattr(func, "__name__", str(func))
        if name in READS or (name in ("__getitem__", "__setitem__") and _boolean_index(args[1])):
            where = traceback.extract_stack()[-2]
            self.reads.append((name, f"{Path(where.filename).name}:{where.lineno} {where.name}"))
        return func(*args, **(kwargs or {}))


def _train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop_index: bool) -> tuple[list, Path]:
    """Two optimizer steps of 2 micro-batches each (tiny model, real dataset and collator, checkpointing on), every
    ``training_step`` under :class:`HostReads`; ``drop_index`` removes the collator's loss index from each batch."""
    from stages.finetune.train import CritiqueTrainer, TrainConfig, finetune

    shas = make_toy(tmp_path)
    manifest = load_manifest(make_manifest(tmp_path))
    make_store(manifest, shas)
    reads: list = []
    step = CritiqueTrainer.training_step

    def watched(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001, ANN202
        if drop_index:
            inputs = {k: v for k, v in inputs.items() if k not in ("label_positions", "label_targets")}
        with HostReads() as mode:
            loss = step(self, model, inputs, num_items_in_batch)
        reads.extend(mode.reads)
        assert self.args.include_num_input_tokens_seen == "no" and not self.args.logging_nan_inf_filter
        return loss

    monkeypatch.setattr(CritiqueTrainer, "training_step", watched)
    cfg = TrainConfig(dataset="toy", run="sync", max_tiles=2, global_batch_size=4, per_device_batch_size=2,
                      workers=0, max_steps=2, save_steps=100, logging_steps=1, gradient_checkpointing=True,
                      vocab_size=300, log_sample_ids=True)
    summary = finetune(cfg, manifest)
    return reads, summary.run_dir


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads, run_dir = _train(tmp_path, monkeypatch, drop_index=False)
    assert [(n, w) for n, w in reads if (n, w.split()[-1]) not in TRANSFORMERS_OWN] == [], reads
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # throughput is still logged: tokens counted on the host, summed at logging steps
    assert any(log.get("tokens_per_second", 0) > 0 for log in logs), logs
    assert len((run_dir / "samples" / "rank0.txt").read_text().splitlines()) == 4  # sample ids: a host list


def test_the_watch_sees_a_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the collator's index the model builds it from ``labels``: the boolean mask and ``nonzero`` show."""
    reads, _ = _train(tmp_path, monkeypatch, drop_index=True)
    assert {"nonzero", "__getitem__"} <= {name for name, _ in reads}, reads
    assert any("label_index" in where for _, where in reads), reads
