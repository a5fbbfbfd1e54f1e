"""Benchmark: IAS-ViT training-step cost against the plain InternVL vision tower.

Prints time(forward + backward, IAS-ViT) / time(forward + backward, plain tower)  (aim <= 1.4)
at InternViT-300M shape (24 layers x 1024, 16 heads, MLP 4096; 448 px, one tile; random init;
every parameter trainable so both backward passes do full work), with the raw timings. The IAS
step starts from the raw 14 x 14 map: cutting it into the saliency tile (tiling.expand_saliency,
on the model's device) is timed with it. Beside the time ratio it prints the FLOP ratio of the
two steps (torch's FlopCounterMode on the meta device): the floor that no implementation of this
architecture goes below. The plain tower shares the IAS tower's tensors (no second copy); the two
are timed alternately after a warm-up (one-layer towers of the same shape: same kernels), and the ratio
printed is the median of the per-pair ratios.
On CPU the steps run on ``--threads`` threads (default 1) and are timed by this process's CPU time
(what the step costs, whatever else runs on the machine), wall time printed beside; on CUDA, by wall
time after synchronising.
Usage: python tests/bench/ias_vit.py [--repeats 3] [--tiles 1] [--threads 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
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
from stages.families.internvl.collate import saliency_inputs  # noqa: E402
from stages.families.fusion import cross_attention_parameters  # noqa: E402
from stages.families.internvl.ias_vit import IASVisionModel  # noqa: E402
from stages.families.internvl.configs import TINY_CONFIGS  # noqa: E402
from stages.families.internvl.tiling import expand_saliency  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flop_ratio(cfg: InternVLVisionConfig, tiles: int) -> tuple[float, float]:
    """(IAS-ViT, plain) forward + backward FLOPs (matmuls, attention, convolutions), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    s = cfg.image_size[0]
    flops = []
    with torch.device("meta"):
        for model, inputs in ((IASVisionModel(cfg), 2), (InternVLVisionModel(cfg), 1)):
            args = [torch.randn(tiles, 3, s, s), torch.rand(tiles, 1, s, s)][:inputs]
            with FlopCounterMode(display=False) as counter:
                model.train()(*args).last_hidden_state.square().mean().backward()
            flops.append(counter.get_total_flops())
    return flops[0], flops[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiles", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the steps")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    require_device(args.device)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    clock = time.process_time if device.type == "cpu" else time.perf_counter

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
    maps = {k: v.to(device) for k, v in saliency_inputs([torch.rand(14, 14)], [(args.tiles, 1, 0)]).items()}

    def step(forward: Callable[[], torch.Tensor], model: torch.nn.Module) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:  # (clock s, wall s)
            model.zero_grad(set_to_none=True)
            _sync(device)
            start, wall = clock(), time.perf_counter()
            forward().square().mean().backward()
            _sync(device)
            return clock() - start, time.perf_counter() - wall

        return run

    def ias_forward() -> torch.Tensor:
        saliency = expand_saliency(maps["saliency_maps"], maps["saliency_map_sizes"], maps["tile_grids"], s)
        return ias(x, saliency).last_hidden_state

    warm = InternVLVisionConfig(**{**TINY_CONFIGS["internvit300m-shape"][0], "num_hidden_layers": 1})
    small_ias, small_plain = IASVisionModel(warm).to(device).train(), InternVLVisionModel(warm).to(device).train()
    step(lambda: small_plain(x).last_hidden_state, small_plain)()  # warm-up: the same kernels, 1/24 of the work
    step(lambda: small_ias(x, torch.ones_like(x[:, :1])).last_hidden_state, small_ias)()
    run_plain = step(lambda: plain(x).last_hidden_state, plain)
    run_ias = step(ias_forward, ias)
    t_plain, t_ias = [], []
    for _ in range(args.repeats):
        t_plain.append(run_plain())
        t_ias.append(run_ias())
    ratios = [i[0] / p[0] for i, p in zip(t_ias, t_plain)]
    wall_ratios = [i[1] / p[1] for i, p in zip(t_ias, t_plain)]
    flops_ias, flops_plain = flop_ratio(cfg, args.tiles)
    n_base = sum(p.numel() for p in plain.parameters())
    n_xattn = sum(p.numel() for _, p in cross_attention_parameters(ias))
    cpu = device.type == "cpu"
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if cpu else ""
    print(f"device {device}, threads {torch.get_num_threads()}{load}, {args.tiles} tile(s) of {s} px, "
          f"{cfg.num_hidden_layers} x {cfg.hidden_size}; base {n_base / 1e6:.1f} M params, "
          f"cross-attention +{n_xattn / 1e6:.1f} M; build {build:.1f} s")
    what = "CPU time" if cpu else "time"
    print(f"forward+backward {what}: plain {statistics.median(t for t, _ in t_plain):.3f} s, IAS-ViT "
          f"{statistics.median(t for t, _ in t_ias):.3f} s (medians of {args.repeats}); per-pair ratios "
          f"{', '.join(f'{r:.3f}' for r in ratios)}" + (f"; wall-time ratios {', '.join(f'{r:.3f}' for r in wall_ratios)}"
                                                      if cpu else ""))
    print(f"FLOPs forward+backward: plain {flops_plain / 1e12:.2f} T, IAS-ViT {flops_ias / 1e12:.2f} T "
          f"-> {flops_ias / flops_plain:.3f} (the architecture's floor)")
    print(f"ratio IAS-ViT / plain = {statistics.median(ratios):.3f}  (aim <= 1.4)")


if __name__ == "__main__":
    main()
