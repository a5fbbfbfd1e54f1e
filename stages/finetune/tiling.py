"""InternVL dynamic tiling of an image and of its saliency map.

The grid follows transformers' ``get_optimal_tiled_canvas`` (the rule of InternVL's
``dynamic_preprocess`` / the GotOcr2 processor's ``crop_to_patches``): the image is resized to
``cols*S x rows*S`` (PIL bicubic), cut row-major into ``S x S`` tiles, and a thumbnail (the whole
image resized to ``S x S``) is appended when there is more than one tile.

Saliency maps live in normalised full-image coordinates, so each tile's saliency tile is the map
sampled bilinearly over exactly that tile's region (``Tiling.boxes``) at the tile's resolution.
"No saliency information" (no map, or a constant map) has one meaning everywhere: the uniform map
of :func:`uniform_saliency`, every pixel equally salient.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def _normalise(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W], rescaled to [0, 1] and standardised."""
    x = torch.from_numpy(pixels.astype(np.float64) / 255.0).float()
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.movedim(-1, -3).contiguous()


def tile_image(
    img: Image.Image,
    tiling: Tiling,
    tile_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """The image's tiles as the InternVL / GotOcr2 processor makes them: [T, 3, S, S] float32."""
    img = img.convert("RGB")
    cols, rows = tiling.grid
    s = tile_size
    canvas = np.asarray(img.resize((cols * s, rows * s), Image.Resampling.BICUBIC))  # [rows*S, cols*S, 3]
    tiles = canvas.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, s, s, 3)
    if tiling.num_tiles > rows * cols:  # thumbnail
        thumb = np.asarray(img.resize((s, s), Image.Resampling.BICUBIC))
        tiles = np.concatenate([tiles, thumb[None]], axis=0)  # [T, S, S, 3]
    return _normalise(tiles, mean, std)


def uniform_saliency(num_tiles: int, tile_size: int) -> torch.Tensor:
    """Saliency tiles that carry no saliency information: all ones, [T, 1, S, S].

    What an image without a map (``--allow-missing-saliency``), a constant map, and the
    "IASC on uniform maps" study variant all get."""
    return torch.ones(num_tiles, 1, tile_size, tile_size)


def saliency_tiles(saliency_map: np.ndarray | torch.Tensor, tiling: Tiling, tile_size: int) -> torch.Tensor:
    """Each tile's saliency tile: the map bilinearly sampled over the tile's box, [T, 1, S, S] in [0, 1].

    The map ([h, w], any scale, normalised full-image coordinates) is min-max normalised per image
    first; a constant map (or one with a non-finite value) carries no saliency information and gives
    :func:`uniform_saliency`.
    """
    m = torch.as_tensor(saliency_map, dtype=torch.float32)
    if m.ndim != 2:
        raise ValueError(f"saliency map must be [h, w], got shape {tuple(m.shape)}")
    lo, hi = m.min(), m.max()
    if not (torch.isfinite(lo) and torch.isfinite(hi) and hi > lo):
        return uniform_saliency(tiling.num_tiles, tile_size)
    m = (m - lo) / (hi - lo)
    # The grid tiles partition the image, so sampling each box at its pixel centres is one bilinear resize of
    # the map to the whole canvas (align_corners=False: output pixel k samples (k+0.5)/size), then a cut.
    cols, rows = tiling.grid
    canvas = F.interpolate(m[None, None], size=(rows * tile_size, cols * tile_size), mode="bilinear",
                           align_corners=False)[0, 0]  # [rows*S, cols*S]
    tiles = canvas.unflatten(0, (rows, tile_size)).unflatten(2, (cols, tile_size))  # [rows, S, cols, S]
    tiles = tiles.permute(0, 2, 1, 3).reshape(rows * cols, 1, tile_size, tile_size)  # [rows*cols, 1, S, S], row-major
    if len(tiling.boxes) > rows * cols:  # the thumbnail: the whole map at tile size
        thumb = F.interpolate(m[None, None], size=(tile_size, tile_size), mode="bilinear", align_corners=False)
        tiles = torch.cat([tiles, thumb])
    return tiles.clamp_(0.0, 1.0)  # [T, 1, S, S]
