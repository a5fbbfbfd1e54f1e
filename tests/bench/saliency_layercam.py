"""Benchmark: LayerCAM cost on dat_base (random init), batch 8, at stages.2, on this CPU.

Prints time(forward + our LayerCAM) / time(forward)  (aim <= 2.5; ~1.1 measured on this CPU class)
and    time(pytorch-grad-cam LayerCAM) / time(ours)  (aim >= 1.3), with the raw timings.
After one warm-up, the three are timed in ``--pairs`` rounds, each round in a rotated order, and every ratio is
taken within its round: the median ratio is printed with its spread (min-max over the rounds), for wall-clock and
process CPU time (the steadier one on a shared machine).
Usage: python tests/bench/saliency_layercam.py [--batch 8] [--pairs 5] [--variant dat_base]
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


def rounds(fns: dict[str, Callable[[], object]], n: int) -> list[dict[str, tuple[float, float]]]:
    """(wall, process CPU) seconds of every function, ``n`` rounds after one warm-up each, the order rotated per round."""
    names = list(fns)
    for name in names:
        fns[name]()
    out = []
    for r in range(n):
        timing = {}
        for name in names[r % len(names):] + names[:r % len(names)]:
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            timing[name] = (time.perf_counter() - w, time.process_time() - c)
        out.append(timing)
    return out


def spread(values: list[float]) -> str:
    """Median and min-max of a ratio over the rounds."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="dat_base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=5, help="rounds of the three timings")
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

    timings = rounds({"forward": forward, "ours": ours, "gradcam": gradcam}, args.pairs)
    print(f"EAT-{args.variant} batch {args.batch}, {torch.get_num_threads()} threads, {args.pairs} rounds "
          f"(median, min-max)")
    for i, clock in enumerate(("wall", "cpu")):
        f, o, g = ([t[k][i] for t in timings] for k in ("forward", "ours", "gradcam"))
        print(f"[{clock}] forward {statistics.median(f):.2f} s, forward+LayerCAM (ours) {statistics.median(o):.2f} s, "
              f"pytorch-grad-cam {statistics.median(g):.2f} s | ours/forward = "
              f"{spread([b / a for a, b in zip(f, o)])} (aim <= 2.5), grad-cam/ours = "
              f"{spread([c / b for b, c in zip(o, g)])} (aim >= 1.3)")


if __name__ == "__main__":
    main()
