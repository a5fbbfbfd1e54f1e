"""IAS follows its saliency map: a toy task only the map can answer, per base family.

Each image is four equal quadrants painted with the four colours of the palette in a random order; the map
marks one quadrant and the target critique names its colour. A tiny model of the family is trained from
scratch on it with the real model, prompt, collator (saliency path included) and loss (critique tokens only),
then greedy generation on held-out images (the real Captioner) is scored:
- IASC with the true map answers the marked colour (>= 0.95);
- a ``--fusion none`` model trained the same way, and the IASC model given uniform maps, cannot know the
  quadrant: every colour is in every image, the marked quadrant is uniform and each colour is marked in
  exactly a quarter of the held-out images, so a map-blind answer is right a quarter of the time (chance
  0.25 +/- 0.1; a constant answer exactly 0.25);
- moving the map onto another quadrant moves the answer (>= 0.9 name the new quadrant's colour).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import set_seed

from stages import families
from stages.families.text import encode_after
from stages.finetune.train import own_lr_for_cross_attention
from stages.report.generate import DecodeConfig

PALETTE = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (230, 220, 40)}
NAMES = list(PALETTE)
CHANCE = 1 / len(NAMES)
STEPS, BATCH, LR, CROSS_ATTENTION_LR = 120, 16, 1e-3, 5e-3  # `finetune --cross-attention-lr`
HELD_OUT = 200
SEED = 0


def toy_image(rng: np.random.Generator, size: int, marked: str | None = None) -> tuple[Image.Image, list[str], int]:
    """(image, colour of each quadrant in row-major order, the marked quadrant): the quadrant of colour ``marked``,
    else a random one."""
    order = [NAMES[i] for i in rng.permutation(len(NAMES))]
    pixels = np.zeros((size, size, 3), np.uint8)
    half = size // 2
    for quadrant, name in enumerate(order):
        r, c = divmod(quadrant, 2)
        pixels[r * half:(r + 1) * half, c * half:(c + 1) * half] = PALETTE[name]
    return Image.fromarray(pixels), order, int(rng.integers(len(NAMES))) if marked is None else order.index(marked)


def quadrant_map(quadrant: int) -> np.ndarray:
    """A 14 x 14 map (EAT's size) that is 1 on one quadrant and 0 elsewhere."""
    m = np.zeros((14, 14), np.float32)
    r, c = divmod(quadrant, 2)
    m[r * 7:(r + 1) * 7, c * 7:(c + 1) * 7] = 1.0
    return m


def train_toy(tiny_model: str, spec: Any, size: int, fusion: str, tmp: Path, seed: int) -> Any:
    """A tiny model of ``tiny_model``'s family trained from scratch on the toy task; returns its Captioner."""
    family = families.of_tiny(tiny_model)
    texts = [" ".join(NAMES)] * 20 + ["Comment on this image from an aesthetic perspective."] * 5
    tokenizer = family.dataset_tokenizer(texts, tmp / f"tokenizer-{family.name}", 300)
    set_seed(seed)
    model = family.build_tiny(tiny_model, tokenizer, fusion)
    captioner = family.captioner(model, tokenizer, spec, torch.device("cpu"))  # prepares prompts like `report`
    collate = family.collator(tokenizer, keep_sample_ids=False)

    def example(img: Image.Image, saliency_map: np.ndarray, target: str) -> dict[str, Any]:
        prompt = captioner.prepare(img, saliency_map)  # tiles / patches, raw map, prompt ids
        labelled = encode_after(tokenizer, prompt.input_ids, target)  # loss on the critique and eos only
        return {**{k: v for k, v in vars(prompt).items() if k != "input_ids"}, **asdict(labelled)}

    rng = np.random.default_rng(seed)
    model.requires_grad_(True).train()  # the Captioner froze it for inference
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    if fusion == "cross_attention":
        own_lr_for_cross_attention(optimizer, model, CROSS_ATTENTION_LR)
    for _ in range(STEPS):
        batch = []
        for _ in range(BATCH):
            img, order, marked = toy_image(rng, size)
            batch.append(example(img, quadrant_map(marked), order[marked]))
        loss = model(**collate(batch)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    return captioner


def accuracy(captioner: Any, tests: list[tuple[Image.Image, list[str], int]], shown: list[int | None]) -> float:
    """Share of held-out images whose critique names the colour of quadrant ``shown[i]`` (None: a uniform map,
    scored against the marked quadrant)."""
    prompts = [captioner.prepare(img, None if q is None else quadrant_map(q)) for (img, _, _), q in zip(tests, shown)]
    answers = []
    for i in range(0, len(prompts), 50):
        answers += captioner.generate(prompts[i:i + 50], DecodeConfig(max_new_tokens=4))
    wanted = [order[marked if q is None else q] for (_, order, marked), q in zip(tests, shown)]
    return sum(a.strip() == w for a, w in zip(answers, wanted)) / len(tests)


def follows_map(tiny_model: str, spec: Any, size: int, tmp: Path, seed: int = SEED) -> dict[str, float]:
    """The four accuracies of the module docstring, on the same held-out images."""
    rng = np.random.default_rng(10_000 + seed)
    tests = [toy_image(rng, size, NAMES[i % len(NAMES)]) for i in range(HELD_OUT)]  # each colour marked equally often
    marked = [m for _, _, m in tests]
    moved = [(m + 1 + int(rng.integers(len(NAMES) - 1))) % len(NAMES) for m in marked]  # another quadrant
    ias = train_toy(tiny_model, spec, size, "cross_attention", tmp, seed)
    plain = train_toy(tiny_model, spec, size, "none", tmp, seed)
    return {"true map": accuracy(ias, tests, marked), "fusion none": accuracy(plain, tests, marked),
            "uniform map": accuracy(ias, tests, [None] * len(tests)), "moved map": accuracy(ias, tests, moved)}


def check(scores: dict[str, float]) -> None:
    assert scores["true map"] >= 0.95, scores
    assert abs(scores["fusion none"] - CHANCE) <= 0.1, scores
    assert abs(scores["uniform map"] - CHANCE) <= 0.1, scores
    assert scores["moved map"] >= 0.9, scores


def test_internvl_follows_map(tmp_path: Path) -> None:
    from stages.families.internvl.dataset import TileSpec

    start = time.perf_counter()
    scores = follows_map("tiny", TileSpec(tile_size=224, max_tiles=1, tokens_per_tile=64), 224, tmp_path)
    print(f"InternVL tiny: {scores} in {time.perf_counter() - start:.0f} s")
    check(scores)


def test_qwen_follows_map(tmp_path: Path) -> None:
    from stages.families.qwen.data import ImageSpec
    from stages.families.qwen.model import image_budget

    start = time.perf_counter()
    scores = follows_map("tiny-qwen", ImageSpec.of(None, image_budget(None, "tiny-qwen")), 112, tmp_path)
    print(f"Qwen2.5-VL tiny-qwen: {scores} in {time.perf_counter() - start:.0f} s")
    check(scores)
