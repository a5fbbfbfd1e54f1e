"""One rank of a real ``finetune`` run that records what FSDP does (test helper, run under torchrun).

Usage: torchrun --nproc_per_node 2 tests/fsdp_probe.py '<json: manifest, out, train config, fsdp overrides>'.
Writes ``out/rank<r>.json``: every gradient reduce-scatter FSDP issued (its input dtype) between the Trainer's
micro-batch events, the dtype of the saliency maps as they reached the model's saliency cut (``saliency``), and
this rank's peak resident memory until training begins (model built, loaded and sharded) above its resident
memory before ``finetune`` (``loaded``).
The reduce-scatter and the saliency cut are observed by wrappers that call the real functions unchanged.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_probe import rss  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from stages.families.internvl import model as _model  # noqa: E402, F401  (imported before the baseline)
from stages.finetune import train  # noqa: E402, F401

try:  # pyarrow's tables import pandas when it is installed (gradio brings it): loaded before the baseline too
    import pandas  # noqa: F401
except ImportError:
    pass

EVENTS: list[list[str]] = []
LOADED: list[int] = []
SALIENCY: list[str] = []
_reduce_scatter = dist.reduce_scatter_single
_saliency_tiles = _model.IASInternVLModel.saliency_tiles


def _recording_reduce_scatter(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    tensor = kwargs.get("input", args[1] if len(args) > 1 else None)
    EVENTS.append(["reduce", str(tensor.dtype).removeprefix("torch.")])
    return _reduce_scatter(*args, **kwargs)


def _recording_saliency_tiles(pixel_values, saliency_maps, *args):  # noqa: ANN001, ANN202
    SALIENCY.append(str(saliency_maps.dtype).removeprefix("torch."))
    return _saliency_tiles(pixel_values, saliency_maps, *args)


class MicroBatches(TrainerCallback):
    """Marks the end of every micro-batch (``substep``) and of every optimizer step (``step``)."""

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        LOADED.append(rss("VmHWM"))  # the model is built, loaded and sharded; no step has run yet

    def on_substep_end(self, args, state, control, **kwargs):  # noqa: ANN001
        EVENTS.append(["substep", ""])

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        EVENTS.append(["step", ""])


def main(spec: dict) -> None:
    dist.reduce_scatter_single = _recording_reduce_scatter
    _model.IASInternVLModel.saliency_tiles = staticmethod(_recording_saliency_tiles)
    cfg = train.TrainConfig(**spec["config"])
    if spec.get("fsdp"):  # overrides of configs/fsdp.yaml for this run
        from stages.finetune.sharding import strategy

        fsdp = strategy("fsdp").training_kwargs(train.model_config(cfg), cfg.gradient_checkpointing)
        cfg.extra = {"fsdp_config": {**fsdp["fsdp_config"], **spec["fsdp"]}}
    base = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    train.finetune(cfg, load_manifest(Path(spec["manifest"])), callbacks=(MicroBatches(),))
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))  # torchrun's; finetune has closed the process group by now
    (out / f"rank{rank}.json").write_text(json.dumps({"events": EVENTS, "loaded": LOADED[0] - base,
                                                            "saliency": sorted(set(SALIENCY))}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
