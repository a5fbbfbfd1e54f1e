"""Batch examples with different token lengths and tile counts.

Token sequences are right-padded; tiles of all images are concatenated in batch order, which
is the order the ``<IMG_CONTEXT>`` runs appear in the flattened ``input_ids`` (InternVL's rule).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stages.finetune.prompting import IGNORE


@dataclass
class Collator:
    pad_token_id: int
    keep_sample_ids: bool = False  # pass ``sample_id`` through (the trainer logs and drops it)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        n = len(examples)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)  # [B, L]
        labels = torch.full((n, length), IGNORE, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((n, length), dtype=torch.long)  # [B, L]
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            input_ids[i, :k] = torch.as_tensor(e["input_ids"])
            labels[i, :k] = torch.as_tensor(e["labels"])
            attention_mask[i, :k] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat([e["pixel_values"] for e in examples]),  # [sum T, 3, S, S]
            "saliency_values": torch.cat([e["saliency_values"] for e in examples]),  # [sum T, 1, S, S]
        }
        if self.keep_sample_ids:
            batch["sample_ids"] = torch.tensor([e["sample_id"] for e in examples], dtype=torch.long)  # [B]
        return batch
