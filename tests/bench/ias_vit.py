"""Benchmark: IAS-ViT training-step cost against the plain InternVL vision tower.

Prints time(forward + backward, IAS-ViT) / time(forward + backward, plain tower)  (aim <= 1.4)
at InternViT-300M shape (24 layers x 1024, 16 heads, MLP 4096; 448 px, one tile; random init;
every parameter trainable so both backward passes do full work), with the raw timings.
The plain tower shares the IAS tower's tensors (no second copy), and the two are timed
alternately so that load from other processes hits both alike. Median of ``--repeats`` after a warm-up.
Usage: python tests/bench/ias_vit.py [--repeats 2] [--tiles 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers.models.internvl.configuration_internvl import InternVLVisionConfig  # noqa: E402
from transformers.models.internvl.modeling_internvl import InternVLVisionModel  # noqa: E402

from pipeline.bench import require_device  # noqa: E402
from stages.finetune.ias_vit import IASVisionModel, cross_attention_parameters  # noqa: E402
from stages.finetune.model import TINY_CONFIGS  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiles", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    require_device(args.device)
    device = torch.device(args.device)

    torch.manual_seed(0)
    cfg = InternVLVisionConfig(**TINY_CONFIGS["internvit300m-shape"][0])
    build = time.perf_counter()
    ias = IASVisionModel(cfg).to(device).train()
    for _, p in cross_attention_parameters(ias):  # a trained fusion: the gates are open
        if p.ndim == 1 and p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.1)
    with torch.device("meta"):
        plain = InternVLVisionModel(cfg)
    base_state = {k: v for k, v in ias.state_dict().items() if ".cross_attention." not in k}
    plain.load_state_dict(base_state, strict=True, assign=True)  # same tensors as the IAS tower's base
    plain.train()
    build = time.perf_counter() - build

    s = cfg.image_size[0]
    x = torch.randn(args.tiles, 3, s, s, device=device)
    sal = torch.rand(args.tiles, 1, s, s, device=device)

    def step(model: torch.nn.Module, *inputs: torch.Tensor) -> Callable[[], float]:
        def run() -> float:
            model.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            model(*inputs).last_hidden_state.square().mean().backward()
            _sync(device)
            return time.perf_counter() - start

        return run

    run_plain, run_ias = step(plain, x), step(ias, x, sal)
    run_plain(), run_ias()  # warm-up
    t_plain, t_ias = [], []
    for _ in range(args.repeats):
        t_plain.append(run_plain())
        t_ias.append(run_ias())
    plain_s, ias_s = statistics.median(t_plain), statistics.median(t_ias)
    n_base = sum(p.numel() for p in plain.parameters())
    n_xattn = sum(p.numel() for _, p in cross_attention_parameters(ias))
    print(f"device {device}, threads {torch.get_num_threads()}, {args.tiles} tile(s) of {s} px, "
          f"{cfg.num_hidden_layers} x {cfg.hidden_size}; base {n_base / 1e6:.1f} M params, "
          f"cross-attention +{n_xattn / 1e6:.1f} M; build {build:.1f} s")
    print(f"forward+backward: plain {plain_s:.3f} s, IAS-ViT {ias_s:.3f} s (median of {args.repeats})")
    print(f"ratio IAS-ViT / plain = {ias_s / plain_s:.3f}  (aim <= 1.4)")


if __name__ == "__main__":
    main()
