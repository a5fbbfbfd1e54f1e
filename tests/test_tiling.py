"""Tiling: pixel tiles against transformers' GotOcr2 processors; saliency tiles by geometry (each tile's box
sampled with grid_sample), against direct resizes, and against the per-image CPU implementation the model's
on-device expansion replaced."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from stages.families.internvl.collate import saliency_inputs
from stages.families.internvl.tiling import (IMAGENET_MEAN, IMAGENET_STD, Tiling, expand_saliency, normalise_tiles,
                                             plan_tiles, tile_image)

# odd sizes and aspect ratios x (tile size, min tiles, max tiles), including max_tiles = 40
CASES = [
    ((333, 517), (448, 1, 12)),
    ((1001, 97), (448, 1, 12)),
    ((333, 517), (224, 1, 40)),
    ((97, 1001), (112, 1, 40)),
    ((448, 448), (448, 1, 12)),
    ((60, 59), (112, 2, 6)),
    ((1203, 801), (112, 4, 9)),
]


def reference_saliency_tiles(saliency_map: np.ndarray, tiling: Tiling, tile_size: int) -> torch.Tensor:
    """The data loader's per-image CPU implementation before saliency moved to the model's device (verbatim but
    for names): min-max normalise, one bilinear resize over the canvas, cut row-major, thumbnail = whole map;
    a constant or non-finite map -> all ones."""
    m = torch.as_tensor(saliency_map, dtype=torch.float32)
    lo, hi = m.min(), m.max()
    if not (torch.isfinite(lo) and torch.isfinite(hi) and hi > lo):
        return torch.ones(tiling.num_tiles, 1, tile_size, tile_size)
    m = (m - lo) / (hi - lo)
    cols, rows = tiling.grid
    canvas = F.interpolate(m[None, None], size=(rows * tile_size, cols * tile_size), mode="bilinear",
                           align_corners=False)[0, 0]
    tiles = canvas.unflatten(0, (rows, tile_size)).unflatten(2, (cols, tile_size))
    tiles = tiles.permute(0, 2, 1, 3).reshape(rows * cols, 1, tile_size, tile_size)
    if len(tiling.boxes) > rows * cols:
        thumb = F.interpolate(m[None, None], size=(tile_size, tile_size), mode="bilinear", align_corners=False)
        tiles = torch.cat([tiles, thumb])
    return tiles.clamp_(0.0, 1.0)


def saliency_tiles(saliency_map: np.ndarray | None, tiling: Tiling, tile_size: int) -> torch.Tensor:
    """One image through the model's path: collate.saliency_inputs -> tiling.expand_saliency."""
    return expand_saliency(*saliency_inputs([saliency_map], [tiling.tile_grid]).values(), tile_size)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _processor_kwargs(tile: int, lo: int, hi: int) -> dict:
    return dict(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=lo, max_patches=hi,
                image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


@pytest.mark.parametrize(("size", "setting"), CASES)
def test_tiles_equal_gotocr2_pil_processor(size: tuple[int, int], setting: tuple[int, int, int]) -> None:
    tile, lo, hi = setting
    img = _image(*size)
    ref = GotOcr2ImageProcessorPil(**_processor_kwargs(tile, lo, hi))(img, return_tensors="pt")["pixel_values"]
    tiling = plan_tiles(*size, tile_size=tile, min_tiles=lo, max_tiles=hi)
    tiles = tile_image(img, tiling, tile)  # what the loader ships: bytes
    assert tiles.dtype == torch.uint8
    ours = normalise_tiles(tiles, torch.float32)  # what the model makes of them on its device
    assert ours.shape == ref.shape == (tiling.num_tiles, 3, tile, tile)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("size", "setting"), CASES[:4])
def test_tiles_match_gotocr2_torchvision_processor(size: tuple[int, int], setting: tuple[int, int, int]) -> None:
    """Same grid and tiles as the torchvision backend; pixels differ only by its bicubic kernel."""
    tile, lo, hi = setting
    img = _image(*size, seed=1)
    ref = GotOcr2ImageProcessor(**_processor_kwargs(tile, lo, hi))(img, return_tensors="pt")["pixel_values"]
    ours = normalise_tiles(tile_image(img, plan_tiles(*size, tile_size=tile, min_tiles=lo, max_tiles=hi), tile),
                           torch.float32)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().mean() < 2e-3


def test_tile_count_matches_processor_and_boxes_cover_image() -> None:
    proc = GotOcr2ImageProcessorPil(**_processor_kwargs(448, 1, 40))
    for w, h in [(100, 4000), (4000, 100), (1920, 1080), (500, 501), (2000, 300)]:
        tiling = plan_tiles(w, h, 448, 1, 40)
        cols, rows = tiling.grid
        expected = proc.get_number_of_image_patches(h, w, {"crop_to_patches": True, "max_patches": 40})
        assert tiling.num_tiles == expected
        grid_boxes = tiling.boxes[: cols * rows]
        assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in grid_boxes) == pytest.approx(1.0)
        if cols * rows > 1:
            assert tiling.boxes[-1] == (0.0, 0.0, 1.0, 1.0)
    assert plan_tiles(448, 448, 448, 1, 1).boxes == [(0.0, 0.0, 1.0, 1.0)]
    assert plan_tiles(900, 448, 448, 1, 12, use_thumbnail=False).num_tiles == 2
    with pytest.raises(ValueError):
        plan_tiles(100, 100, max_tiles=41)


@pytest.mark.parametrize(("size", "spot"), [((1000, 600), (0.71, 0.38)), ((517, 333), (0.12, 0.83)), ((300, 900), (0.55, 0.07))])
def test_saliency_hot_spot_lands_where_image_hot_spot_is(size: tuple[int, int], spot: tuple[float, float]) -> None:
    """A bright pixel in the image and a hot spot in the map at the same normalised point end up
    in the same tile and (within a pixel) the same place in it."""
    w, h = size
    u, v = spot
    tile = 112
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[int(v * h) - 3 : int(v * h) + 3, int(u * w) - 3 : int(u * w) + 3] = 255  # 6x6 bright block around the spot
    img = Image.fromarray(arr)
    sal = np.zeros((56, 72), dtype=np.float32)  # map resolution unrelated to the image's
    sal[int(v * 56), int(u * 72)] = 5.0
    tiling = plan_tiles(w, h, tile, 1, 12, use_thumbnail=False)
    assert tiling.num_tiles > 1

    bright = tile_image(img, tiling, tile).float().mean(1)  # [T, S, S]
    maps = saliency_tiles(sal, tiling, tile)  # [T, 1, S, S]
    assert maps.shape == (tiling.num_tiles, 1, tile, tile)
    assert maps.min() >= 0 and maps.max() <= 1
    t_img, y_img, x_img = np.unravel_index(int(bright.argmax()), bright.shape)
    t_map, _, y_map, x_map = np.unravel_index(int(maps.argmax()), maps.shape)
    assert t_img == t_map
    # the map's hot pixel is 1/72 x 1/56 of the image wide: its centre may sit half a map pixel off the spot
    cols, rows = tiling.grid
    tol_x = tile * cols / 72 / 2 + 2
    tol_y = tile * rows / 56 / 2 + 2
    assert abs(int(x_img) - int(x_map)) <= tol_x and abs(int(y_img) - int(y_map)) <= tol_y


def test_saliency_tile_values_against_direct_resize() -> None:
    """The 1x1-grid tile equals the whole map resized bilinearly (torch interpolate, no align corners)."""
    rng = np.random.default_rng(3)
    sal = rng.random((14, 14)).astype(np.float32) * 7
    tiling = plan_tiles(448, 448, 448, 1, 1)
    ours = saliency_tiles(sal, tiling, 448)
    m = torch.from_numpy(sal)
    m = (m - m.min()) / (m.max() - m.min())
    ref = torch.nn.functional.interpolate(m[None, None], size=(448, 448), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # a 2x1 grid: the left tile is the left half of the map resized to the tile's resolution
    tiling = plan_tiles(896, 448, 224, 2, 2, use_thumbnail=True)
    assert tiling.grid == (2, 1)
    big = torch.nn.functional.interpolate(m[None, None], size=(224, 448), mode="bilinear", align_corners=False)
    tiles = saliency_tiles(sal, tiling, 224)
    torch.testing.assert_close(tiles[0], big[0, :, :, :224], rtol=0, atol=1e-5)
    torch.testing.assert_close(tiles[1], big[0, :, :, 224:], rtol=0, atol=1e-5)


def test_constant_map_means_no_saliency_information_uniform() -> None:
    """A constant map (e.g. LayerCAM's all-zero map when no gradient is positive) is the uniform map, as for an
    image without a map: every pixel of every tile (thumbnail included) equally salient, all ones."""
    tiling = plan_tiles(120, 50, 56, 1, 6)
    assert tiling.num_tiles > 2
    ones = torch.ones(tiling.num_tiles, 1, 56, 56)
    assert torch.equal(saliency_tiles(None, tiling, 56), ones)
    nan_spot = np.random.default_rng(0).random((14, 14))
    nan_spot[3, 4] = np.nan
    for constant in (np.full((7, 7), 3.0), np.zeros((14, 14), np.float32), np.full((14, 14), np.nan), nan_spot,
                     np.full((1, 1), 0.5)):
        assert torch.equal(saliency_tiles(constant, tiling, 56), ones)


def _maps(seed: int) -> list[np.ndarray | None]:
    """Maps of several sizes (EAT's 14 x 14, ground-truth 56 x 56, odd ones), missing, constant and NaN maps."""
    rng = np.random.default_rng(seed)
    nan = rng.random((14, 14)).astype(np.float32)
    nan[5, 2] = np.nan
    return [rng.random((14, 14)).astype(np.float32) * 9 - 3, rng.random((56, 56)).astype(np.float32), None,
            rng.random((7, 9)).astype(np.float32), np.zeros((14, 14), np.float32), rng.random((3, 2)).astype(np.float32),
            nan, rng.standard_normal((14, 14)).astype(np.float32) * 1e-3, np.full((56, 56), 2.0, np.float32)]


@pytest.mark.parametrize("batch", [1, 3, 9])
def test_expand_saliency_equals_the_per_image_cpu_implementation(batch: int) -> None:
    """Batches of images with odd sizes, many tile grids (with and without thumbnail, up to 40 tiles) and maps
    of different sizes give exactly the tiles the per-image implementation gave, image after image."""
    sizes = [(333, 517), (1001, 97), (97, 1001), (448, 448), (60, 59), (1203, 801), (500, 501), (2000, 300),
             (777, 333)]
    settings = [(56, 1, 12, True), (28, 1, 40, True), (56, 2, 6, False), (28, 4, 9, True), (56, 1, 1, True)]
    for k, setting in enumerate(settings):
        tile, lo, hi, thumb = setting
        for start in range(0, len(sizes), batch):
            maps = _maps(seed=10 * k + start)[start:start + batch]
            tilings = [plan_tiles(w, h, tile, lo, hi, thumb) for w, h in sizes[start:start + batch]]
            ours = expand_saliency(*saliency_inputs(maps, [t.tile_grid for t in tilings]).values(), tile)
            ref = torch.cat([torch.ones(t.num_tiles, 1, tile, tile) if m is None else reference_saliency_tiles(m, t, tile)
                             for m, t in zip(maps, tilings)])
            assert ours.shape == ref.shape and torch.equal(ours, ref), (setting, start)


@pytest.mark.parametrize(("size", "setting"), CASES)
def test_expand_saliency_samples_each_tile_box(size: tuple[int, int], setting: tuple[int, int, int]) -> None:
    """Geometry oracle: tile t is the normalised map sampled bilinearly (grid_sample) at the pixel centres of its
    box ``Tiling.boxes[t]`` in full-image coordinates, edges clamped."""
    tile, lo, hi = setting
    tiling = plan_tiles(*size, tile_size=tile, min_tiles=lo, max_tiles=hi)
    sal = np.random.default_rng(4).random((11, 17)).astype(np.float32) * 5
    m = torch.from_numpy((sal - sal.min()) / (sal.max() - sal.min()))[None, None]  # [1, 1, h, w]
    centres = (torch.arange(tile) + 0.5) / tile  # pixel centres within a tile, in [0, 1]
    expected = []
    for x0, y0, x1, y1 in tiling.boxes:
        ys, xs = torch.meshgrid(y0 + (y1 - y0) * centres, x0 + (x1 - x0) * centres, indexing="ij")
        grid = torch.stack([xs, ys], -1)[None] * 2 - 1  # [1, S, S, 2] in grid_sample's [-1, 1]
        expected.append(F.grid_sample(m, grid, mode="bilinear", padding_mode="border", align_corners=False)[0])
    torch.testing.assert_close(saliency_tiles(sal, tiling, tile), torch.stack(expected), rtol=0, atol=2e-6)
