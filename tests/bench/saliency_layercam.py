"""Benchmark: LayerCAM cost on dat_base (random init), batch 8, at stages.2, on this CPU.

Prints time(forward + our LayerCAM) / time(forward)  (aim <= 2.5; ~1.1 measured on this CPU class)
and    time(pytorch-grad-cam LayerCAM) / time(ours)  (aim >= 1.3), with the raw timings.
Each timing is the median of ``--repeats`` runs after one warm-up; wall-clock and process CPU
time are both reported (CPU time is the steadier one on a shared machine).
Usage: python tests/bench/saliency_layercam.py [--batch 8] [--repeats 3] [--variant dat_base]
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

from pipeline.bench import skip  # noqa: E402
from stages.saliency.eat import build_eat, target_layer  # noqa: E402
from stages.saliency.layercam import layercam  # noqa: E402


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of ``repeats`` calls after a warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="dat_base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        from pytorch_grad_cam import LayerCAM
    except ImportError:
        skip("pytorch-grad-cam (the oracle compared against) is not installed: pip install -e '.[dev]'")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = build_eat(args.variant)
    layer = target_layer(model)
    x = torch.randn(args.batch, 3, 224, 224)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def ours() -> None:
        layercam(model, layer, x)

    cam = LayerCAM(model=model, target_layers=[layer])

    def gradcam() -> None:
        cam(input_tensor=x, targets=None)  # argmax class per image, as ours
        model.zero_grad(set_to_none=True)

    results = {name: timed(fn, args.repeats) for name, fn in
               (("forward", forward), ("ours", ours), ("gradcam", gradcam))}
    print(f"EAT-{args.variant} batch {args.batch}, {torch.get_num_threads()} threads")
    for i, clock in enumerate(("wall", "cpu")):
        f, o, g = (results[k][i] for k in ("forward", "ours", "gradcam"))
        print(f"[{clock}] forward {f:.2f} s, forward+LayerCAM (ours) {o:.2f} s, pytorch-grad-cam {g:.2f} s | "
              f"ours/forward = {o / f:.2f} (aim <= 2.5), grad-cam/ours = {g / o:.2f} (aim >= 1.3)")


if __name__ == "__main__":
    main()
