"""InternVL dynamic tiling of an image, and the matching cut of its saliency map.

The grid follows transformers' ``get_optimal_tiled_canvas`` (the rule of InternVL's
``dynamic_preprocess`` / the GotOcr2 processor's ``crop_to_patches``): the image is resized to
``cols*S x rows*S`` (PIL bicubic), cut row-major into ``S x S`` tiles, and a thumbnail (the whole
image resized to ``S x S``) is appended when there is more than one tile.

Saliency maps live in normalised full-image coordinates, so each tile's saliency tile is the map
sampled bilinearly over exactly that tile's region (``Tiling.boxes``) at the tile's resolution. The
data loader ships each image's tiles as uint8, its small raw map and its tile grid; on the model's device
:func:`normalise_tiles` makes the pixel values and :func:`expand_saliency` cuts the maps into saliency
tiles. "No saliency information" (no map, or a constant map) has one meaning everywhere: every pixel
equally salient, all ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # InternVL's processor normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_TILES = 40

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Tiling:
    """Where each tile of one image comes from."""

    grid: tuple[int, int]  # (cols, rows)
    boxes: list[Box]  # per tile (x0, y0, x1, y1) in normalised full-image coords; thumbnail last = (0, 0, 1, 1)

    @property
    def num_tiles(self) -> int:
        return len(self.boxes)

    @property
    def tile_grid(self) -> tuple[int, int, int]:
        """(cols, rows, thumbnail 0 | 1): all :func:`expand_saliency` needs to cut a map like the image."""
        cols, rows = self.grid
        return cols, rows, int(self.num_tiles > cols * rows)


def plan_tiles(
    width: int, height: int, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 12, use_thumbnail: bool = True
) -> Tiling:
    """Choose the tile grid for a ``width x height`` image and list every tile's region."""
    if not 1 <= min_tiles <= max_tiles <= MAX_TILES:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles <= {MAX_TILES}, got min_tiles={min_tiles}, max_tiles={max_tiles}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    cols, rows = get_optimal_tiled_canvas((height, width), (tile_size, tile_size), min_tiles, max_tiles)
    boxes: list[Box] = [
        (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows) for r in range(rows) for c in range(cols)
    ]
    if use_thumbnail and len(boxes) > 1:
        boxes.append((0.0, 0.0, 1.0, 1.0))
    return Tiling(grid=(cols, rows), boxes=boxes)


def tile_image(img: Image.Image, tiling: Tiling, tile_size: int) -> torch.Tensor:
    """The image's tiles as the InternVL / GotOcr2 processor cuts them, before normalisation: [T, 3, S, S] uint8.

    Tiles travel from the loader as bytes (a quarter of float32: ~25 MB for a 41-tile sample at 448 px instead of
    ~99 MB through a worker's shared memory); :func:`normalise_tiles` makes the processor's ``pixel_values`` where
    the model runs.
    """
    img = img.convert("RGB")
    cols, rows = tiling.grid
    s = tile_size
    canvas = np.asarray(img.resize((cols * s, rows * s), Image.Resampling.BICUBIC))  # [rows*S, cols*S, 3]
    tiles = canvas.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, s, s, 3)
    if tiling.num_tiles > rows * cols:  # thumbnail
        thumb = np.asarray(img.resize((s, s), Image.Resampling.BICUBIC))
        tiles = np.concatenate([tiles, thumb[None]], axis=0)  # [T, S, S, 3]
    return torch.from_numpy(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)))  # [T, 3, S, S] uint8


def normalise_tiles(tiles: torch.Tensor, dtype: torch.dtype, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """uint8 tiles [T, 3, S, S] -> the processor's ``pixel_values`` in ``dtype``, computed where ``tiles`` lives:
    rescaled to [0, 1] and standardised per channel in float32, then cast. The constants stay Python numbers (a
    tensor made from them would be a host-to-device copy, which waits for the GPU)."""
    x = tiles.float() / 255.0  # [T, 3, S, S]
    return torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(zip(mean, std))], dim=1).to(dtype)


def expand_saliency(maps: torch.Tensor, sizes: Sequence[tuple[int, int]], grids: Sequence[tuple[int, int, int]],
                    tile_size: int) -> torch.Tensor:
    """Every image's saliency tiles, computed where ``maps`` lives: [sum T, 1, S, S] float32 in [0, 1].

    maps [B, H, W]: image b's raw map (any scale, normalised full-image coordinates) in ``maps[b, :h, :w]``,
    zero padded; sizes: its (h, w), (0, 0) for an image without a map; grids: its ``Tiling.tile_grid`` (cols,
    rows, thumbnail). Sizes and grids are host lists (``collate.saliency_inputs``): they fix the shapes, so nothing
    here reads the device. Each map is min-max normalised, resized bilinearly once over its image's
    ``rows*S x cols*S`` canvas and cut row-major like the image; the thumbnail is the whole map at ``S x S``. No map,
    a constant map and a map with a non-finite value all give all-ones tiles.
    """
    s = tile_size
    tiles = []
    for b, ((h, w), (cols, rows, thumb)) in enumerate(zip(sizes, grids)):
        if h * w == 0:
            tiles.append(torch.ones(cols * rows + thumb, 1, s, s, device=maps.device))
            continue
        one = maps[b, :h, :w].float()  # [h, w]
        lo, hi = one.amin(), one.amax()  # NaN propagates
        informative = torch.isfinite(lo) & torch.isfinite(hi) & (hi > lo)  # 0-d, stays on the device
        one = ((one - lo) / torch.where(informative, hi - lo, 1.0))[None, None]  # [1, 1, h, w], [0, 1]
        # The grid tiles partition the image, so sampling each box at its pixel centres is one bilinear resize of
        # the map to the whole canvas (align_corners=False: output pixel k samples (k+0.5)/size), then a cut.
        canvas = F.interpolate(one, size=(rows * s, cols * s), mode="bilinear", align_corners=False)[0, 0]
        cut = canvas.unflatten(0, (rows, s)).unflatten(2, (cols, s))  # [rows, S, cols, S]
        cut = cut.permute(0, 2, 1, 3).reshape(rows * cols, 1, s, s)  # [rows*cols, 1, S, S], row-major
        if thumb:  # the whole map at tile size
            cut = torch.cat([cut, F.interpolate(one, size=(s, s), mode="bilinear", align_corners=False)])
        tiles.append(torch.where(informative, cut.clamp_(0.0, 1.0), 1.0))  # [T_b, 1, S, S]
    return torch.cat(tiles)
