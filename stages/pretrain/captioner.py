"""Pretrain the demo's base MLLM: a tiny InternVL taught to describe the synthetic scenes.

The analogue of a real pretrained InternVL (what users fine-tune): a plain ``InternVLForConditionalGeneration``
(the ``demo`` shape of stages/finetune/model.py, no saliency fusion) trained from scratch to write each
image's plain scene description (``synthetic_attributes.scene_description``: what is where, then every
attribute value in judgement-free words), never a critique. Its vision tower also feeds the auxiliary
image-level heads of stages/pretrain/targets.py (dropped when saving). The tokenizer is a byte-level BPE
trained on the corpus's descriptions and reference critiques, so fine-tuning on critiques needs no new
tokens. One tile per image (the whole image at 224 x 224), as the demo fine-tunes it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from stages.ingest.synthetic_attributes import ATTRIBUTES, described_values, scene_description
from stages.pretrain.targets import AuxHeads, Targets


@dataclass(frozen=True)
class CaptionerRecipe:
    shape: str = "demo"  # a registered tiny shape (stages/finetune/model.py TINY_CONFIGS)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    vocab_size: int = 2048
    seed: int = 0


def normalise(u8: Tensor) -> Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float with InternVL's (ImageNet) mean / std."""
    from stages.finetune.tiling import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (u8.permute(0, 3, 1, 2).float() / 255 - mean) / std


def tokenizer_texts(records: list[dict[str, Any]], seed: int, n_reference_images: int = 3000) -> list[str]:
    """Every description, plus the five reference critiques of the first images (the critics' vocabulary)."""
    from stages.ingest.synthetic_corpus import annotation

    texts = [scene_description(r["attributes"], r["scene"]) for r in records]
    texts += [ref for r in records[:n_reference_images] for ref in annotation(r["index"], seed)["references"]]
    return texts


@torch.no_grad()
def describe(model: nn.Module, tokenizer: Any, images: np.ndarray, batch_size: int = 32,
             max_new_tokens: int = 90) -> list[str]:
    """Greedy descriptions of [N, 224, 224, 3] images (one tile each)."""
    from stages.finetune.model import tokens_per_tile
    from stages.finetune.prompting import prompt_ids

    model.eval()
    ids = prompt_ids(tokenizer, tokens_per_tile(model.config))
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        x = normalise(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])))
        prompt = torch.tensor([ids] * len(x))
        gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=x,
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        out += [" ".join(t.split()) for t in tokenizer.batch_decode(gen[:, prompt.shape[1]:], skip_special_tokens=True)]
    return out


def evaluate(model: nn.Module, tokenizer: Any, images: np.ndarray, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of held-out images whose greedy description names each true attribute value (and only it)."""
    texts = describe(model, tokenizer, images)
    named = [described_values(t) for t in texts]
    accuracy = {k: float(np.mean([n.get(k) == {r["attributes"][k]} for n, r in zip(named, records)]))
                for k in ATTRIBUTES}
    return {"attributes": accuracy, "mean_accuracy": float(np.mean(list(accuracy.values()))),
            "distinct": len(set(texts)) / len(texts), "example": texts[0]}


def pretrain_captioner(images: np.ndarray, records: list[dict[str, Any]], val: tuple[np.ndarray, list[dict[str, Any]]],
                       recipe: CaptionerRecipe, out_dir: Path, corpus_seed: int) -> dict[str, Any]:
    """Train on [N, 224, 224, 3] uint8 images + records; save a plain InternVL ``-hf`` directory + tokenizer."""
    from stages.finetune.collate import Collator
    from stages.finetune.model import build_tiny_model, tokens_per_tile
    from stages.finetune.prompting import encode_example
    from stages.finetune.tokenizer import IMG_CONTEXT, train_bpe

    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = train_bpe(tokenizer_texts(records, corpus_seed), vocab_size=recipe.vocab_size)
    model = build_tiny_model(recipe.shape, vocab_size=len(tokenizer),
                             image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT), fusion="none")
    n_context = tokens_per_tile(model.config)
    encoded = [encode_example(tokenizer, n_context, scene_description(r["attributes"], r["scene"])) for r in records]
    targets = Targets.of(records)
    aux = AuxHeads(model.config.vision_config.hidden_size)
    pooled: list[Tensor] = []
    model.model.vision_tower.register_forward_hook(
        lambda m, i, o: pooled.append(o.last_hidden_state[:, 1:].mean(dim=1)))  # patch tokens, no CLS: [B, D]
    params = [*model.parameters(), *aux.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, steps_per_epoch // 2
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    collate = Collator(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(recipe.seed)
    history = []
    bar = tqdm(total=total, desc=f"pretrain demo base ({recipe.shape})", unit="step")
    for epoch in range(recipe.epochs):
        model.train()
        losses = []
        for idx in torch.randperm(len(images), generator=generator).split(recipe.batch_size):
            idx = idx.sort().values
            x = normalise(torch.from_numpy(images[idx.numpy()]))  # [b, 3, 224, 224]: one tile per image
            batch = collate([{"input_ids": encoded[i].input_ids, "labels": encoded[i].labels, "pixel_values": x[j:j + 1],
                              "saliency_map": None, "tile_grid": (1, 1, 0)}  # one tile, no saliency (no fusion)
                             for j, i in enumerate(idx.tolist())])
            pooled.clear()
            lm = model(**batch).loss
            loss = lm + recipe.aux_weight * aux.loss(pooled[0], targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(lm.item())
            bar.update()
            bar.set_postfix(caption_loss=f"{np.mean(losses[-50:]):.3f}")
        record = {"epoch": epoch + 1, "caption_loss": float(np.mean(losses)), **evaluate(model, tokenizer, *val)}
        history.append(record)
        tqdm.write(f"pretrain demo base epoch {epoch + 1}: caption loss {record['caption_loss']:.3f}, held-out "
                   f"description accuracy " + " ".join(f"{k} {v:.2f}" for k, v in record["attributes"].items())
                   + f", distinct {record['distinct']:.2f}")
    bar.close()
    save_plain_internvl(model, tokenizer, out_dir)
    return {"recipe": asdict(recipe), "n_images": len(images), "history": history, "validation": history[-1],
            "train_seconds": round(time.perf_counter() - start, 1)}


def save_plain_internvl(model: nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """Write the model as a plain transformers InternVL ``-hf`` directory (no IAS fields) + tokenizer, atomically."""
    import shutil

    from transformers import InternVLForConditionalGeneration
    from transformers.models.internvl.configuration_internvl import InternVLConfig

    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("ias_fusion", "model_type", "transformers_version", "architectures")}
    plain = InternVLForConditionalGeneration(InternVLConfig(**fields))
    plain.load_state_dict(model.state_dict(), strict=True)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
