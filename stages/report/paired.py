"""Paired comparison of two variants scored on the same images with the same seeds.

Scores come as arrays ``[seeds, images]`` (one value per image per training seed, the same images and seeds in
both). The contrast is the mean paired difference ``a - b``, with
- a 95 % bootstrap CI that resamples seeds and images independently (a two-way, "pigeonhole" bootstrap: both
  the training seed and the image sample vary between replications), percentile method. It is conservative:
  where seeds do not shift the result it counts the per-unit noise up to three times (Owen 2007), and where
  they do, a bootstrap over images alone would fall short;
- a two-sided paired permutation p over images (each image's seed-averaged pair has its labels swapped or
  not; scipy's ``permutation_test`` with ``permutation_type="samples"``). It is conditional on the trained
  models: it asks whether these models differ on the population of images, while the CI also asks whether
  retraining with new seeds would reproduce the difference (with a real seed-to-seed spread the p alone
  overstates the evidence; read the two together).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Contrast:
    diff: float  # mean of a - b over seeds x images
    ci95: tuple[float, float]
    p: float  # two-sided paired permutation p over images
    seeds: int
    images: int

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ci95": list(self.ci95)}


RESAMPLES = 4000  # bootstrap draws and permutations (the permutation p is never below 1 / (RESAMPLES + 1))


def paired_contrast(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> Contrast:
    """Mean paired difference ``a - b`` of two ``[seeds, images]`` score arrays, its CI and permutation p."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or min(a.shape) < 1:
        raise ValueError(f"need two [seeds, images] arrays of one shape, got {a.shape} and {b.shape}")
    if a.shape[1] < 2:
        raise ValueError("need at least two images for a paired comparison")
    d = a - b  # [S, N]
    lo, hi = np.quantile(two_way_bootstrap(d, resamples, seed), [0.025, 0.975])
    per_image_a, per_image_b = a.mean(axis=0), b.mean(axis=0)  # [N]: seed-averaged pairs
    test = stats.permutation_test(
        (per_image_a, per_image_b), lambda x, y: np.mean(x - y), permutation_type="samples",
        alternative="two-sided", n_resamples=resamples, random_state=seed,
    )
    return Contrast(float(d.mean()), (float(lo), float(hi)), float(test.pvalue), *d.shape)


def two_way_bootstrap(d: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``d`` [S, N] over ``resamples`` draws of seeds and images with replacement, independently: [R]."""
    n_seeds, n_images = d.shape
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=resamples)  # [R, S]
    image_counts = rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=resamples)  # [R, N]
    return ((seed_counts @ d) * image_counts).sum(axis=1) / (n_seeds * n_images)  # [R]


def share_recovered(eat: np.ndarray, uniform: np.ndarray, truth: np.ndarray, resamples: int = RESAMPLES,
                    seed: int = 0) -> tuple[float, tuple[float, float]]:
    """(eat - uniform) / (truth - uniform): the share of the true map's gain that EAT maps recover, with a
    two-way bootstrap 95 % CI (``[seeds, images]`` arrays, resampled together)."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (eat, uniform, truth)]
    if len({x.shape for x in arrays}) != 1 or arrays[0].ndim != 2:
        raise ValueError("need three [seeds, images] arrays of one shape")
    eat, uniform, truth = arrays
    gained = two_way_bootstrap(eat - uniform, resamples, seed)  # same seed: the same draws for both
    possible = two_way_bootstrap(truth - uniform, resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = gained / possible
    boot = boot[np.isfinite(boot)]
    lo, hi = np.quantile(boot, [0.025, 0.975]) if boot.size else (float("nan"), float("nan"))
    gain = float((truth - uniform).mean())
    return (float("nan") if gain == 0 else float((eat - uniform).mean()) / gain), (float(lo), float(hi))
