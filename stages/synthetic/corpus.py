"""Deterministic synthetic demo corpus: photo-like images with known aesthetic attributes.

Generator version 3. Each image is a landscape scene (sky gradient with clouds, textured ground, a horizon
line) with ``N_SUBJECTS`` textured subjects of comparable size, saturation and texture; one of them is the
*aesthetic subject*. Six attributes are drawn per image (``ATTRIBUTES``); four belong to the aesthetic subject
(``SUBJECT_ATTRIBUTES``), the other subjects draw theirs independently (only one subject can be centred), so
describing the wrong subject is wrong at a known rate; horizon and noise are global:

- placement: subject centred on a rule-of-thirds point / dead centre / cut by the frame edge
- exposure:  subject crushed dark (under) / normal / clipped highlights (blown)
- colour:    subject in two desaturated analogous hues / saturated analogous / complementary clash
- focus:     subject texture crisp / Gaussian-blurred (sigma 14-20 % of its radius)
- horizon:   level / tilted by 4-10 degrees
- noise:     mild grain / strong luminance + chroma noise

Score (``SCORE_BASE`` + ``SCORE_WEIGHTS`` + noise), clipped to [1, 10], reads only the aesthetic subject's
and the global attributes::

    score = 5.5 + placement{thirds +1.0, centre -0.3, edge -0.9}
                + exposure{balanced +0.8, under -0.5, blown -0.6}
                + colour{vivid +0.9, muted -0.2, clashing -0.7}
                + focus{sharp +0.7, blurred -0.7}
                + horizon{level +0.35, tilted -0.45}
                + noise{clean +0.1, noisy -0.4}
                + N(0, 0.4)

The aesthetic subject carries one small cue: a crisp spot of 0.12 of its radius at its centre, drawn over the
subject as it is rendered (after its blur and exposure: near black, near white on an underexposed subject), which a
model trained on scores can learn to find. (In version 2 the spot was drawn before the blur and grey on dark
subjects, so on blurred or underexposed aesthetic subjects it all but vanished, and the EAT did not learn it.) The mask (255 = aesthetically relevant) is the aesthetic subject's
silhouette dilated by a fixed ``MASK_DILATION``: nothing in its shape encodes an attribute value.
``subjects/<id>.png`` labels every subject's dilated silhouette (k + 1 for subject k of the annotation's
"subjects"), so a mask can be moved onto another subject; ``scenes/<id>.json`` (and the annotation's "scene") is what
``render`` drew: each subject's centre, size, pattern and hues, the sky, ground and horizon. Five colloquial references per image mention
random subsets of the true attributes (``attributes.PHRASES``) and an overall verdict tied to the score.
Same (n, seed) gives byte-identical files.
"""
from __future__ import annotations

import colorsys
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import uniform_filter
from tqdm import tqdm

from stages.synthetic.attributes import ATTRIBUTES, SCORE_WEIGHTS, SUBJECT_ATTRIBUTES, reference
from storage.atomic import write_bytes_atomic

GENERATOR_VERSION = 3
ANNOTATIONS = "annotations.jsonl"
JPEG_QUALITY = 92
SPLITS = (("train", 0.7), ("validation", 0.1), ("test", 0.2))

_NOISY_PROB = 0.3  # the other attributes are drawn uniformly
N_SUBJECTS = 3
CUE_RADIUS = 0.12  # the aesthetic subject's centre spot, in subject radii
MASK_DILATION = 0.02  # masks: each silhouette dilated by this fraction of sqrt(h * w) pixels

SCORE_BASE = 5.5
SCORE_NOISE_SD = 0.4


# Background palettes (RGB in [0, 1]): chroma (max - min) <= 0.35, far below a vivid subject's (>= 0.68), and
# brightness well below 1, so only blown regions clip to white.
_SKIES = (
    ((0.36, 0.50, 0.70), (0.68, 0.76, 0.84)),  # clear day
    ((0.38, 0.36, 0.52), (0.80, 0.66, 0.56)),  # dusk
    ((0.58, 0.60, 0.64), (0.78, 0.79, 0.80)),  # overcast
    ((0.48, 0.58, 0.68), (0.80, 0.80, 0.76)),  # hazy
)
SKY_NAMES = ("clear", "dusk", "overcast", "hazy")  # in _SKIES order
GROUND_NAMES = ("grass", "a dry field", "sand", "the sea", "soil")  # in _GROUNDS order
PATTERN_NAMES = ("striped", "ringed", "checked")
_GROUNDS = (
    (0.30, 0.42, 0.22),  # grass
    (0.52, 0.48, 0.30),  # dry field
    (0.70, 0.64, 0.50),  # sand
    (0.20, 0.32, 0.42),  # sea
    (0.40, 0.32, 0.26),  # soil
)


# ---------------------------------------------------------------------------------------------- annotations


def score_of(attributes: dict[str, str], rng: np.random.Generator) -> float:
    """Aesthetic score in [1, 10]: the module docstring's formula."""
    s = SCORE_BASE + sum(SCORE_WEIGHTS[k][v] for k, v in attributes.items())
    return float(np.clip(s + rng.normal(0.0, SCORE_NOISE_SD), 1.0, 10.0))


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    attrs = {k: str(rng.choice(v)) for k, v in ATTRIBUTES.items() if k != "noise"}
    attrs["noise"] = "noisy" if rng.random() < _NOISY_PROB else "clean"
    return attrs


def sample_subjects(rng: np.random.Generator, aesthetic: dict[str, str]) -> tuple[list[dict[str, str]], int]:
    """Every subject's attributes (the aesthetic one's from ``aesthetic``, the others drawn independently, except
    that only one subject can take the centre) in drawing order, and the aesthetic subject's index."""
    index = int(rng.integers(N_SUBJECTS))
    taken_centre = aesthetic["placement"] == "centre"
    subjects = []
    for k in range(N_SUBJECTS):
        if k == index:
            subjects.append({key: aesthetic[key] for key in SUBJECT_ATTRIBUTES})
            continue
        other = {key: str(rng.choice(ATTRIBUTES[key])) for key in SUBJECT_ATTRIBUTES}
        if other["placement"] == "centre" and taken_centre:
            other["placement"] = str(rng.choice(["thirds", "edge"]))
        taken_centre |= other["placement"] == "centre"
        subjects.append(other)
    return subjects, index


def assign_splits(n: int, seed: int) -> list[str]:
    """~70/10/20 train/validation/test, a seeded permutation of the indices."""
    order = np.random.default_rng([seed, 7919]).permutation(n)
    n_train, n_val = round(n * SPLITS[0][1]), round(n * SPLITS[1][1])
    split = ["test"] * n
    for rank, i in enumerate(order):
        split[i] = "train" if rank < n_train else "validation" if rank < n_train + n_val else "test"
    return split


def image_id(index: int) -> str:
    return f"syn{index:05d}"


def rngs(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams for the annotation and the rendering of one image."""
    ann, img = np.random.SeedSequence([seed, index]).spawn(2)
    return np.random.default_rng(ann), np.random.default_rng(img)


def annotation(index: int, seed: int) -> dict[str, Any]:
    """Attributes, score and references of image ``index`` (no rendering needed)."""
    rng, _ = rngs(seed, index)
    attrs = sample_attributes(rng)
    score = score_of(attrs, rng)
    references = [reference(rng, attrs, score) for _ in range(5)]
    subjects, aesthetic = sample_subjects(rng, attrs)
    return {"attributes": attrs, "score": round(score, 3), "references": references, "subjects": subjects,
            "aesthetic": aesthetic}


# ---------------------------------------------------------------------------------------------- rendering


def _field(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Smooth random field, ~unit std, with about ``cells`` blobs along the longer side. [h, w]"""
    gh, gw = (max(2, math.ceil(cells * s / max(h, w)) + 1) for s in (h, w))
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the two leading axes by three box passes (fast for large sigma)."""
    size = max(1, int(round(math.sqrt(12.0 * sigma**2 / 3.0 + 1.0))))
    axes_size = (size, size) + (1,) * (x.ndim - 2)
    for _ in range(3):
        x = uniform_filter(x, size=axes_size, mode="nearest")
    return x


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width): aspect w/h log-uniform in [1/2, 5/2], both sides in [256, 1024]."""
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.5)))
    long_min = 256 * max(aspect, 1 / aspect)
    long_side = rng.uniform(max(384.0, long_min), 1024.0)
    w, h = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
    return int(np.clip(round(h), 256, 1024)), int(np.clip(round(w), 256, 1024))


def _jitter(rng: np.random.Generator, colour: tuple[float, ...], amount: float = 0.04) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 1)


def _background(rng: np.random.Generator, h: int, w: int, h0: float, angle: float, scene: dict[str, Any]) -> np.ndarray:
    """Sky with clouds above the horizon (y = h0 at the centre, tilted by ``angle``), textured ground below.

    Rendered at half resolution and upsampled bicubically (it is smooth; this saves most of its cost). [h, w, 3]
    """
    full = (w, h)
    h, w, h0 = (h + 1) // 2, (w + 1) // 2, h0 / 2
    horizon = (h0 + math.tan(angle) * (np.arange(w, dtype=np.float32) - w / 2))[None, :]  # [1, w]
    yy = np.arange(h, dtype=np.float32)[:, None]
    sky_kind = int(rng.integers(len(_SKIES)))
    top, bottom = (_jitter(rng, c) for c in _SKIES[sky_kind])
    ground_kind = int(rng.integers(len(_GROUNDS)))
    ground = _jitter(rng, _GROUNDS[ground_kind])
    scene.update(sky=SKY_NAMES[sky_kind], ground=GROUND_NAMES[ground_kind])
    t = np.clip(yy / np.maximum(horizon, 1.0), 0, 1)[..., None]  # 0 at top, 1 at the horizon
    sky = top * (1 - t) + bottom * t
    clouds = np.clip(_field(rng, h, w, 5) * 0.5 + _field(rng, h, w, 14) * 0.2 - 0.1, 0, 1)[..., None]
    sky = sky + (0.86 - sky) * clouds * rng.uniform(0.2, 0.8)
    depth = np.clip((yy - horizon) / (h - horizon.min() + 1.0), 0, 1)[..., None]  # 0 at horizon, 1 at bottom
    texture = 1 + 0.10 * _field(rng, h, w, 10) + 0.05 * _field(rng, h, w, 40)
    land = ground * (0.8 + 0.25 * depth) * texture[..., None]
    land = land + (bottom - land) * 0.35 * np.exp(-depth / 0.08)  # haze near the horizon
    in_sky = np.clip(horizon - yy + 0.5, 0, 1)[..., None]
    scene = (sky * in_sky + land * (1 - in_sky)) * rng.uniform(0.8, 1.05)
    small = Image.fromarray((np.clip(scene, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(small.resize(full, Image.Resampling.BICUBIC), dtype=np.float32) / 255


def _blob(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, radius: float,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Irregular ellipse: normalised coords (u, v) and the shape's signed distance in pixels (>0 inside)."""
    e, rot = rng.uniform(0.8, 1.25), rng.uniform(0, math.pi)
    dx, dy = xx - cx, yy - cy
    u = (math.cos(rot) * dx + math.sin(rot) * dy) / (radius * e)
    v = (-math.sin(rot) * dx + math.cos(rot) * dy) * e / radius
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    edge = 1 + 0.06 * np.cos(2 * theta + rng.uniform(0, 2 * math.pi))
    if rng.random() < 0.6:
        edge = edge + rng.uniform(0.06, 0.16) * np.cos(int(rng.integers(3, 8)) * theta + rng.uniform(0, 2 * math.pi))
    return u, v, (edge - rho) * radius


def _slots(rng: np.random.Generator, h: int, w: int, radius: float) -> dict[str, list[tuple[float, float]]]:
    """Candidate centres per placement value: four rule-of-thirds points, the centre, one point on each side.

    With ``radius`` at most min(h, w) / 6.8 no two slots' subjects overlap (beyond their lobes)."""
    thirds = [(w * fx + rng.uniform(-0.02, 0.02) * w, h * fy + rng.uniform(-0.02, 0.02) * h)
              for fx in (1 / 3, 2 / 3) for fy in (1 / 3, 2 / 3)]
    centre = [(w / 2 + rng.uniform(-0.02, 0.02) * w, h / 2 + rng.uniform(-0.02, 0.02) * h)]
    along, inset = rng.uniform(0.3, 0.7, 4), rng.uniform(0.0, 0.35, 4) * radius
    edge = [(inset[0], along[0] * h), (w - inset[1], along[1] * h), (along[2] * w, inset[2]),
            (along[3] * w, h - inset[3])]
    return {"thirds": thirds, "centre": centre, "edge": edge}


def _subject_colours(rng: np.random.Generator, colour: str) -> tuple[tuple[float, float], np.ndarray, np.ndarray]:
    """(hues, first colour, second colour) of a subject's two-colour pattern."""
    hue, side, spread, jitter = rng.random(), rng.choice([-1, 1]), rng.uniform(0.06, 0.12), rng.uniform(-1, 1)
    if colour == "vivid":
        hues, sats, vals = (hue, hue + side * spread), (0.85, 0.95), (0.95, 0.8)
    elif colour == "muted":
        hues, sats, vals = (hue, hue + 0.08 * jitter), (0.18, 0.12), (0.72, 0.5)
    else:  # clashing: complementary, both saturated
        hues, sats, vals = (hue, hue + 0.5 + 0.04 * jitter), (0.95, 0.95), (0.95, 0.95)
    c1, c2 = (np.array(colorsys.hsv_to_rgb(hh % 1.0, s, v), np.float32) for hh, s, v in zip(hues, sats, vals))
    return (round(float(hues[0] % 1.0), 4), round(float(hues[1] % 1.0), 4)), c1, c2


def _subject(rng: np.random.Generator, attrs: dict[str, str], centre: tuple[float, float], radius: float, h: int,
             w: int, dilation: float, cue: bool) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray,
                                                          dict[str, Any]]:
    """Render one subject in its crop box: (box, premultiplied rgb [ch, cw, 3], alpha [ch, cw], silhouette mask
    dilated by ``dilation`` px [ch, cw], what was drawn). ``cue``: the aesthetic subject's small centre spot.

    The random draws and the box do not depend on the attribute values, so the silhouette never does."""
    cx, cy = centre
    blur, dim = rng.uniform(0.14, 0.2) * radius, rng.uniform(0.2, 0.3)
    sigma = blur if attrs["focus"] == "blurred" else 0.0
    reach = 1.5 * radius + 3 * 0.2 * radius + dilation + 4
    y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 1)
    x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    u, v, dist = _blob(xx, yy, cx, cy, radius, rng)
    alpha = np.clip(dist / 1.2 + 0.5, 0, 1)

    # Two-colour pattern (stripes / rings / checks) with hard edges, fine grain, spherical shading.
    freq, ang = rng.uniform(1.2, 2.2) * 2 * math.pi, rng.uniform(0, math.pi)
    kind = int(rng.integers(3))
    if kind == 0:
        wave = np.sin(freq * (u * math.cos(ang) + v * math.sin(ang)))
    elif kind == 1:
        wave = np.sin(freq * np.hypot(u, v))
    else:
        wave = np.sin(freq * u) * np.sin(freq * v) * 2
    p = np.clip(0.5 + 4 * wave, 0, 1)[..., None]
    hues, c1, c2 = _subject_colours(rng, attrs["colour"])
    grain = 1 + 0.08 * _field(rng, y1 - y0, x1 - x0, (2 * reach) / (radius / 10))
    light = np.array([-0.5, -0.6, 0.62], np.float32) * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    light /= np.linalg.norm(light)
    nx, ny = (xx - cx) / radius, (yy - cy) / radius
    nz = np.sqrt(np.clip(1 - nx**2 - ny**2, 0, 1))
    lit = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0, 1)
    rgb = (c1 * (1 - p) + c2 * p) * ((0.45 + 0.6 * lit) * grain)[..., None]
    if attrs["exposure"] == "under":
        rgb = rgb * dim
    elif attrs["exposure"] == "blown":
        rgb = rgb * 1.5 + 1.5 * (lit**3)[..., None]  # lit side clips to white
    rgb = rgb * alpha[..., None]
    if sigma > 0:
        stack = _gaussian_blur(np.concatenate([rgb, alpha[..., None]], axis=-1), sigma)
        rgb, alpha = stack[..., :3], stack[..., 3]
    if cue:  # a crisp spot over whatever the subject looks like: near black on a lit subject, near white on a dark one
        spot = np.clip((CUE_RADIUS * radius - np.hypot(xx - cx, yy - cy)) / 1.2 + 0.5, 0, 1)[..., None]
        rgb = rgb * (1 - spot) + spot * alpha[..., None] * (0.9 if attrs["exposure"] == "under" else 0.05)
    drawn = {"x": round(float(cx / w), 4), "y": round(float(cy / h), 4), "size": round(radius / math.sqrt(h * w), 4),
             "pattern": PATTERN_NAMES[kind], "hues": list(hues)}
    return (slice(y0, y1), slice(x0, x1)), rgb, alpha, dist > -dilation, drawn


def render(ann: dict[str, Any], rng: np.random.Generator,
           scene: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one image: (rgb uint8 [h, w, 3], aesthetic mask uint8 [h, w] in {0, 255}, subject labels uint8 [h, w]:
    0 background, k + 1 where subject k's dilated silhouette lies, later subjects over earlier ones).

    ``ann`` is :func:`annotation`'s (its "subjects", "aesthetic" and global "attributes"). ``scene``, when
    given, receives what was drawn besides the attributes: sky, ground, horizon height (0 top .. 1 bottom) and
    angle (degrees, > 0: lower on the right), and per subject its centre (fractions of width / height), size,
    pattern and hues, in the annotation's subject order.
    """
    scene = {} if scene is None else scene
    attrs, subjects, aesthetic = ann["attributes"], ann["subjects"], ann["aesthetic"]
    h, w = _image_size(rng)
    tilt = rng.uniform(4, 10) * rng.choice([-1, 1])
    angle = math.radians(tilt) if attrs["horizon"] == "tilted" else 0.0
    h0 = rng.uniform(0.35, 0.65) * h
    scene.update(horizon_height=round(h0 / h, 4), horizon_angle=round(math.degrees(angle), 3))
    canvas = _background(rng, h, w, h0, angle, scene)

    radius = min(rng.uniform(0.095, 0.115) * math.sqrt(h * w), min(h, w) / 6.8)
    dilation = MASK_DILATION * math.sqrt(h * w)
    slots = _slots(rng, h, w, radius)
    for free in slots.values():
        rng.shuffle(free)
    mask = np.zeros((h, w), bool)
    labels = np.zeros((h, w), np.uint8)
    drawn = []
    for k, subject in enumerate(subjects):
        centre = slots[subject["placement"]].pop()
        box, rgb, alpha, silhouette, info = _subject(rng, subject, centre, radius * rng.uniform(0.92, 1.08), h, w,
                                                     dilation, cue=k == aesthetic)
        canvas[box] = canvas[box] * (1 - alpha[..., None]) + rgb
        labels[box][silhouette] = k + 1
        if k == aesthetic:
            mask[box] |= silhouette
        drawn.append(info)
    scene["subjects"] = drawn

    sd = rng.uniform(0.06, 0.09) if attrs["noise"] == "noisy" else rng.uniform(0.0, 0.012)
    canvas += rng.standard_normal((h, w, 1), dtype=np.float32) * sd  # luminance, per pixel
    chroma = rng.standard_normal(((h + 1) // 2, (w + 1) // 2, 3), dtype=np.float32) * (sd * 0.5)  # blotchy chroma
    canvas += chroma.repeat(2, axis=0).repeat(2, axis=1)[:h, :w]
    image = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image, mask.astype(np.uint8) * 255, labels


# ---------------------------------------------------------------------------------------------- corpus


def _encode(data: Any, fmt: str) -> bytes:
    if fmt == "JSON":
        return json.dumps(data, sort_keys=True).encode("utf-8")
    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(data).save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        Image.fromarray(data, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _recorded_params(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8").splitlines()[0])["generator"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _intact(path: Path) -> bool:
    """The file decodes completely (a kill can only leave a temp file behind, but trust nothing)."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
            return True
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


# folder, suffix, format: the image, its aesthetic mask, its subject labels and what render drew (``scene``)
FILES = (("images", "jpg", "JPEG"), ("masks", "png", "PNG"), ("subjects", "png", "PNG"), ("scenes", "json", "JSON"))


def _make_image(root: Path, seed: int, index: int) -> tuple[int, int, float, dict[str, Any]]:
    """Render image ``index`` unless intact copies of its image, mask, subject labels and scene exist, writing only
    the missing ones (a kill between writes leaves finished files untouched); (width, height, mask fraction,
    scene)."""
    iid = image_id(index)
    paths = [root / f"{folder}/{iid}.{suffix}" for folder, suffix, _ in FILES]
    done = [_intact(path) for path in paths]
    if all(done):
        with Image.open(paths[0]) as img, Image.open(paths[1]) as m:
            return img.width, img.height, float((np.asarray(m) > 0).mean()), json.loads(paths[3].read_text())
    scene: dict[str, Any] = {}
    image, mask, labels = render(annotation(index, seed), rngs(seed, index)[1], scene)
    for path, finished, data, (_, _, fmt) in zip(paths, done, (image, mask, labels, scene), FILES):
        if not finished:
            write_bytes_atomic(path, _encode(data, fmt))
    return image.shape[1], image.shape[0], float((mask > 0).mean()), scene


def _generated_files(root: Path) -> list[Path]:
    """Every image, mask, label and scene file under ``root``."""
    return [p for folder, suffix, _ in FILES for p in root.glob(f"{folder}/syn*.{suffix}")]


def generate_corpus(root: Path, n: int = 240, seed: int = 0, workers: int | None = None) -> None:
    """Write ``n`` images, masks, subject label maps and ``annotations.jsonl`` under ``root``; no-op when done.

    Resumable: ``generator.json`` records the parameters first; a rerun with the same parameters keeps every
    intact file (each is written atomically and is deterministic) and renders the rest, in
    ``workers`` processes (default: one per core, at most 4). ``annotations.jsonl`` is written last, so its
    presence means a complete corpus. Other parameters: everything is removed and regenerated.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from storage.atomic import write_json_atomic

    root = Path(root)
    params = {"n": n, "seed": seed, "version": GENERATOR_VERSION}
    if _recorded_params(root / ANNOTATIONS) == params:
        return
    start = time.perf_counter()
    try:
        previous = json.loads((root / "generator.json").read_text())
    except (OSError, ValueError):
        previous = None
    for orphan in [p for folder, _, _ in FILES for p in root.glob(f"{folder}/.syn*.tmp")]:  # a killed run's writes
        orphan.unlink(missing_ok=True)
    if previous != params:  # nothing here belongs to these parameters
        for stale in [root / ANNOTATIONS, *_generated_files(root)]:
            stale.unlink(missing_ok=True)
        write_json_atomic(root / "generator.json", params)
    workers = workers or min(4, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 and n > 32 else _Serial() as pool:
        made = list(tqdm(pool.map(_make_image, [root] * n, [seed] * n, range(n), chunksize=8), total=n,
                         desc="synthetic corpus", unit="img", leave=False))
    keep = {f"{folder}/{image_id(i)}.{suffix}" for i in range(n) for folder, suffix, _ in FILES}
    for stale in _generated_files(root):
        if stale.relative_to(root).as_posix() not in keep:
            stale.unlink()
    splits = assign_splits(n, seed)
    records = []
    for i, (width, height, _, scene) in enumerate(made):
        iid = image_id(i)
        records.append({"image_id": iid, "split": splits[i], "file": f"images/{iid}.jpg", "mask": f"masks/{iid}.png",
                        "subject_labels": f"subjects/{iid}.png", **annotation(i, seed), "scene": scene,
                        "width": width, "height": height, "generator": params})
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    write_bytes_atomic(root / ANNOTATIONS, lines.encode("utf-8"))
    counts = {s: splits.count(s) for s, _ in SPLITS}
    mask_fraction = sum(m for _, _, m, _ in made) / max(1, n)
    tqdm.write(
        f"synthetic corpus: {n} images (train {counts['train']} / validation {counts['validation']} / "
        f"test {counts['test']}, mean mask {mask_fraction:.0%}) -> {root} in {time.perf_counter() - start:.1f} s"
    )


class _Serial:
    """``pool.map`` in this process (small corpora: no worker start-up)."""

    def __enter__(self) -> "_Serial":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def map(fn: Any, *iterables: Any, chunksize: int = 1) -> Any:
        return map(fn, *iterables)
