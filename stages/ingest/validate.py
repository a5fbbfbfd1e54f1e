"""Image checks for ingest: path safety, full decode, pixel limit, aspect ratio, byte hash.

Paths must stay inside the dataset root, lexically and (unless the dataset allows external links)
after following symbolic links: a link out of the root is quarantined (``outside_root``) without
reading its target.

Results are cached per file (size, mtime) so a re-ingest after adding a few images only
decodes the new ones. Decoding runs in a small thread pool (PIL releases the GIL).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from storage.atomic import write_parquet_atomic
from storage.image_files import RootGuard
from storage.images import DEFAULT_MAX_PIXELS, ImageError, ImageInfo, inspect_image, safe_join

CHUNK = 1024  # images queued on the thread pool at a time
SAVE_EVERY_S = 60.0  # checkpoint the cache this often during long runs
MAX_ASPECT_RATIO = 20.0  # longer side / shorter side; beyond 20:1 tiling and saliency are meaningless
CACHE_SCHEMA = pa.schema([
    ("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()),
])


@dataclass(frozen=True)
class Checked:
    info: ImageInfo | None  # None when rejected
    reason: str | None = None
    detail: str | None = None


def file_stat(root: Path, rel: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of an image, or None when absent / outside the root."""
    try:
        st = safe_join(root, rel).stat()
    except (ImageError, OSError):
        return None
    return st.st_size, st.st_mtime_ns


def check_image(root: Path, rel: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Checked:
    """Every check one image must pass before it enters ``images.parquet``."""
    try:
        info = inspect_image(safe_join(root, rel), max_pixels)
    except ImageError as e:
        return Checked(None, e.reason, e.detail)
    ratio = max(info.width, info.height) / min(info.width, info.height)
    if ratio > MAX_ASPECT_RATIO:
        return Checked(None, "extreme_aspect_ratio",
                       f"{rel}: {info.width}x{info.height} is {ratio:.1f}:1 (limit {MAX_ASPECT_RATIO:g}:1)")
    return Checked(info)


def load_cache(path: Path) -> dict[str, tuple[int, int, Checked]]:
    if not path.exists():
        return {}
    try:
        rows = pq.read_table(path, schema=CACHE_SCHEMA).to_pylist()
    except (OSError, pa.ArrowException):
        return {}  # a damaged cache only costs recomputation
    cache = {}
    for r in rows:
        info = ImageInfo(r["width"], r["height"], r["sha256"]) if r["reason"] is None else None
        cache[r["path"]] = (r["size"], r["mtime_ns"], Checked(info, r["reason"], r["detail"]))
    return cache


def save_cache(path: Path, entries: dict[str, tuple[int, int, Checked]]) -> None:
    rows = [
        {"path": rel, "size": size, "mtime_ns": mtime, "reason": c.reason, "detail": c.detail,
         "width": c.info.width if c.info else None, "height": c.info.height if c.info else None,
         "sha256": c.info.sha256 if c.info else None}
        for rel, (size, mtime, c) in entries.items()
    ]
    write_parquet_atomic(path, pa.Table.from_pylist(rows, schema=CACHE_SCHEMA))


def links_outside(root: Path, rels: list[str]) -> dict[str, Checked]:
    """``outside_root`` rejections of the paths that are (or pass through) links leaving ``root``."""
    guard = RootGuard(root)
    out = {}
    for rel in rels:
        try:
            target = guard.outside(safe_join(root, rel))
        except (ImageError, OSError):
            continue  # an unsafe or unreadable path: check_image says why
        if target is not None:
            out[rel] = Checked(None, "outside_root", f"{rel} links to {target}, outside the dataset root {root} "
                                                     "(not read; set allow_external_links: true to follow it)")
    return out


def check_images(
    root: Path, rels: list[str], cache_path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 4,
    allow_external_links: bool = False,
) -> dict[str, Checked]:
    """Check every image (cached by size + mtime); rewrites the cache with exactly these files."""
    cache = load_cache(cache_path)
    results = {} if allow_external_links else links_outside(root, rels)
    stats = {rel: file_stat(root, rel) for rel in rels if rel not in results}
    todo = []
    for rel, st in stats.items():
        hit = cache.get(rel)
        if st is not None and hit is not None and hit[:2] == st:
            results[rel] = hit[2]
        else:
            todo.append(rel)
    def snapshot() -> None:
        save_cache(cache_path, {rel: (*st, results[rel]) for rel, st in stats.items() if st and rel in results})

    last_save = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(todo), desc="checking images", unit="img", disable=not todo, leave=False) as bar:
        for start in range(0, len(todo), CHUNK):  # bounded queue; progress survives a kill
            chunk = todo[start:start + CHUNK]
            for rel, c in zip(chunk, pool.map(lambda rel: check_image(root, rel, max_pixels), chunk)):
                results[rel] = c
                bar.update()
            if time.monotonic() - last_save > SAVE_EVERY_S:
                snapshot()
                last_save = time.monotonic()
    snapshot()
    return results
