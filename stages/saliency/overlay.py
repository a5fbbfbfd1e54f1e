"""Heatmap overlay of a saliency map on its image (for `saliency show` and the report gallery)."""
from __future__ import annotations

import numpy as np
from PIL import Image

# matplotlib's "jet" colormap as piecewise-linear (position, value) knots per channel
_JET = {
    "r": ((0.0, 0.35, 0.66, 0.89, 1.0), (0.0, 0.0, 1.0, 1.0, 0.5)),
    "g": ((0.0, 0.125, 0.375, 0.64, 0.91, 1.0), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0)),
    "b": ((0.0, 0.11, 0.34, 0.65, 1.0), (0.5, 1.0, 1.0, 0.0, 0.0)),
}


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape [...] -> RGB in [0, 1], shape [..., 3]."""
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, *_JET[c]) for c in "rgb"], axis=-1)


def normalise(saliency: np.ndarray) -> np.ndarray:
    """Min-max scale a raw map to [0, 1] (a constant map becomes all zeros)."""
    m = np.nan_to_num(saliency.astype(np.float64))
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def overlay(img: Image.Image, map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend the jet-coloured map [h, w] (normalised full-image coordinates) over ``img``; same size as ``img``."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0  # [H,W,3]
    small = Image.fromarray(normalise(map).astype(np.float32))
    heat = np.asarray(small.resize(img.size, Image.Resampling.BILINEAR), dtype=np.float64)  # [H,W]
    blended = (1.0 - alpha) * rgb + alpha * jet(heat)
    return Image.fromarray(np.round(blended * 255.0).astype(np.uint8))
