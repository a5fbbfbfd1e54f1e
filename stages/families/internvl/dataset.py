"""InternVL's training stream: one example per (image, reference comment) pair (data.CritiqueData).

Each item opens its image, tiles it, reads that image's raw saliency map from the store by sha256 (one
row, never the whole store; the model cuts it into saliency tiles on its device), and tokenises the
chat-formatted example.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.families.data import CritiqueData
from stages.families.internvl.prompting import encode_example, prompt_ids
from stages.families.internvl.tiling import plan_tiles, tile_image
from storage.images import open_rgb, safe_join


@dataclass(frozen=True)
class TileSpec:
    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    tokens_per_tile: int = 256  # (tile_size / patch)^2 * downsample_ratio^2


class CritiqueDataset(CritiqueData):
    """``(image, comment)`` pairs of one split -> tiles, raw saliency map + tile grid, and tokens (``spec``: a
    :class:`TileSpec`; an image's tokens are its tiles x tokens per tile)."""

    image_limit_option = "--max-tiles"

    def prompt_ids(self, n_image_tokens: int) -> list[int]:
        return prompt_ids(self.tokenizer, n_image_tokens)

    def image_tokens(self, width: int, height: int) -> int:
        t = self.spec
        return plan_tiles(width, height, t.tile_size, t.min_tiles, t.max_tiles, t.use_thumbnail).num_tiles \
            * t.tokens_per_tile

    def describe_image_tokens(self, n: int) -> str:
        return f"{n // self.spec.tokens_per_tile} tiles x {self.spec.tokens_per_tile} tokens"

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, sha, text = self.items[index]
        img = open_rgb(safe_join(self.root, path))
        t = self.spec
        tiling = plan_tiles(img.width, img.height, t.tile_size, t.min_tiles, t.max_tiles, t.use_thumbnail)
        pixel_values = tile_image(img, tiling, t.tile_size)  # [T, 3, S, S]
        n_tiles = pixel_values.shape[0]
        enc = encode_example(self.tokenizer, t.tokens_per_tile * n_tiles, text, self.max_length)
        return {
            "sample_id": index,
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "pixel_values": pixel_values,
            "saliency_map": self.saliency_map(sha),  # [h, w] or None
            "tile_grid": tiling.tile_grid,  # (cols, rows, thumbnail)
        }

