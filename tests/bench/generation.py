"""Benchmark: batched generation throughput against batch-1 generation for the demo model.

Prints images/s and generated tokens/s batched (left padding, KV cache, one ``generate`` per batch)
and one image at a time, and their ratio (aim >= 4x). The demo model is the tiny InternVL of
``make demo`` (random init; a trained run via --run DATASET/RUN); images of mixed aspect ratios
(1 to 3 tiles) so the batches carry real padding. Both sides decode greedily to the same outputs
(checked), timed in ``--pairs`` alternated pairs after a warm-up (batched first in even pairs, batch-1 first in
odd ones); the ratio is taken within each pair and printed as the median with its spread (min-max).
Usage: python tests/bench/generation.py [--images 32] [--batch-size 16] [--tokens 32] [--max-tiles 4]
       [--pairs 3] [--device cpu] [--run D/R]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.bench import require_device, skip  # noqa: E402
from stages.families.captioner import Captioner, DecodeConfig  # noqa: E402
from stages.families.internvl.captioner import InternVLCaptioner  # noqa: E402
from stages.report.generate import load_run  # noqa: E402


def demo_captioner(device: torch.device, max_tiles: int) -> Captioner:
    from stages.families.internvl.dataset import TileSpec
    from stages.families.internvl.model import build_tiny_model, tokens_per_tile
    from stages.families.internvl.tokenizer import IMG_CONTEXT, train_bpe

    words = ["lovely light", "strong composition", "the horizon is tilted", "colours feel muted",
             "sharp focus on the eyes", "crop tighter", "nice leading lines", "too much noise"]
    tok = train_bpe([f"{a}, {b}." for a in words for b in words] * 4, vocab_size=2048)
    torch.manual_seed(0)
    model = build_tiny_model("demo", vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT))
    tiles = TileSpec(tile_size=224, max_tiles=max_tiles, tokens_per_tile=tokens_per_tile(model.config))
    return InternVLCaptioner(model, tok, tiles, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens per critique")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-tiles", type=int, default=4, help="tiling of the demo runs (make demo: 4)")
    parser.add_argument("--run", default=None, help="DATASET/RUN: bench that run's checkpoint instead")
    parser.add_argument("--pairs", type=int, default=3, help="alternated (batched, batch-1) timing pairs")
    args = parser.parse_args()
    require_device(args.device)
    device = torch.device(args.device)
    if args.run:
        dataset, run = args.run.split("/", 1)
        try:
            captioner = load_run(dataset, run, device=device)[0]
        except FileNotFoundError as e:
            skip(f"--run {args.run}: {e}")
    else:
        captioner = demo_captioner(device, args.max_tiles)
    rng = np.random.default_rng(0)
    sizes = [(320, 240), (240, 320), (300, 300), (480, 200)]
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in
              (sizes[i % len(sizes)] for i in range(args.images))]
    prompts = [captioner.prepare(img, rng.random((14, 14))) for img in images]
    prompts.sort(key=lambda p: -len(p.input_ids))  # as generate_split orders them
    decode = DecodeConfig(max_new_tokens=args.tokens)
    b = args.batch_size

    def batched() -> list[list[int]]:
        return [ids for i in range(0, len(prompts), b) for ids in captioner.generate_ids(prompts[i:i + b], decode)]

    def single() -> list[list[int]]:
        return [captioner.generate_ids([p], decode)[0] for p in prompts]

    captioner.generate_ids(prompts[:2], decode)  # warm-up
    timings: dict[str, list[float]] = {"batched": [], "batch-1": []}
    outputs = {}
    for pair in range(args.pairs):
        order = (("batched", batched), ("batch-1", single)) if pair % 2 == 0 else (("batch-1", single), ("batched", batched))
        for name, fn in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            outputs[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings[name].append(time.perf_counter() - t0)
    same = outputs["batched"] == outputs["batch-1"]
    tokens = sum(len(x) for x in outputs["batched"])
    tiles = sum(p.pixel_values.shape[0] for p in prompts)
    print(f"generation, demo model on {device}: {len(prompts)} images ({tiles} tiles), {tokens} new tokens, "
          f"batch {b}, threads {torch.get_num_threads()}, {args.pairs} alternated pairs (median)")
    for name, ts in timings.items():
        t = statistics.median(ts)
        print(f"  {name:8s} {t:7.2f} s  {len(prompts) / t:7.2f} img/s  {tokens / t:8.1f} tok/s")
    ratios = [one / many for many, one in zip(timings["batched"], timings["batch-1"])]
    print(f"  batched / batch-1 throughput: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f} "
          f"over the pairs; aim >= 4x); outputs identical: {same}")


if __name__ == "__main__":
    main()
