"""Batch examples with different token lengths and tile counts.

Token sequences are right-padded; tiles of all images (uint8, normalised on the model's device) are
concatenated in batch order, which is the order the ``<IMG_CONTEXT>`` runs appear in the flattened
``input_ids`` (InternVL's rule). Saliency travels as each image's small raw map plus its tile grid
(:func:`saliency_inputs`); the model cuts the maps into saliency tiles on its device
(``tiling.expand_saliency``). Everything whose value fixes a shape or an index is made here, on the host
(map sizes and tile grids as lists, the labelled positions as an index tensor), so a training step never
reads a value back from the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from stages.families.data import pad_tokens, sample_ids
from stages.families.text import IGNORE


def saliency_inputs(maps: Sequence[np.ndarray | torch.Tensor | None],
                    tile_grids: Sequence[tuple[int, int, int]]) -> dict[str, Any]:
    """The model's saliency inputs for a batch of images (see ``tiling.expand_saliency``).

    ``maps``: each image's raw map [h_i, w_i] (sizes may differ), None for no map; ``tile_grids``: each
    image's ``Tiling.tile_grid``. Returns saliency_maps [B, max h, max w] float32 (zero padded) and, as host
    lists, saliency_map_sizes [(h, w)] (0 x 0 for no map) and tile_grids [(cols, rows, thumbnail)].
    """
    shapes = [(0, 0) if m is None else tuple(m.shape) for m in maps]
    if any(len(shape) != 2 for shape in shapes):
        raise ValueError(f"saliency maps must be [h, w], got shapes {sorted(set(shapes))}")
    padded = torch.zeros(len(maps), max((h for h, _ in shapes), default=0), max((w for _, w in shapes), default=0))
    for b, (m, (h, w)) in enumerate(zip(maps, shapes)):
        if h * w:
            padded[b, :h, :w] = torch.as_tensor(m, dtype=torch.float32)
    return {
        "saliency_maps": padded,  # [B, H, W]
        "saliency_map_sizes": [(int(h), int(w)) for h, w in shapes],
        "tile_grids": [tuple(int(v) for v in grid) for grid in tile_grids],
    }


def label_index(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a host batch's loss is: (positions [N], targets [N]), both int64.

    ``positions`` index the flattened [B * L] sequence at every position whose next token is labelled (the
    causal-LM shift), ``targets`` are those next tokens. The model computes logits only there.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]  # [B, L]: the token each position predicts
    keep = shifted.reshape(-1) != IGNORE  # [B * L]
    return keep.nonzero()[:, 0], shifted.reshape(-1)[keep]


@dataclass
class Collator:
    pad_token_id: int
    keep_sample_ids: bool = False  # pass ``sample_id`` through (the trainer logs and drops it)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = pad_tokens(examples, self.pad_token_id)  # input_ids, attention_mask, labels [B, L]
        positions, targets = label_index(tokens["labels"])
        batch = {
            **tokens,
            "label_positions": positions,  # [N]
            "label_targets": targets,  # [N]
            "pixel_values": torch.cat([e["pixel_values"] for e in examples]),  # [sum T, 3, S, S] uint8
            **saliency_inputs([e["saliency_map"] for e in examples], [e["tile_grid"] for e in examples]),
        }
        if self.keep_sample_ids:
            batch["sample_ids"] = sample_ids(examples)  # [B] host list
        return batch
