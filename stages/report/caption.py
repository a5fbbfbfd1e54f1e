"""``ase-mllm caption PATH...``: aesthetic critiques of your own photos.

Files and folders are expanded (folders by :func:`storage.image_files.find_images`, the rule ingest
uses: recursive, image suffixes, hidden names skipped), deduplicated and sorted. Each image goes
through the one inference entry, :class:`stages.report.critique.Critic` (as in ``ase-mllm serve``):
its saliency map and score from the store when the store has its sha256, else computed on the fly
with the manifest's EAT + LayerCAM; then tiling + generation with a fine-tuned run, in batches. Writes
``captions.jsonl`` / ``captions.csv`` (path, critique, aesthetic score, heatmap path, error),
heatmap overlays under ``heatmaps/`` and an ``index.html`` gallery. An unreadable file, or one whose
name is not valid UTF-8 (``bad_filename``), becomes a row with its error; the others proceed.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.manifest import Manifest
from pipeline.paths import runs_dir
from stages.report.generate import DecodeConfig, is_untrained
from storage.atomic import atomic_path, write_bytes_atomic
from storage.image_files import find_images, is_utf8, printable
from storage.images import ImageError

CSV_FIELDS = ("path", "critique", "aesthetic_score", "heatmap", "saliency", "error")


@dataclass
class CaptionRow:
    path: str
    critique: str | None = None
    aesthetic_score: float | None = None  # EAT's predicted score
    heatmap: str | None = None  # overlay PNG, relative to the output dir
    saliency: str | None = None  # "store" | "computed"
    error: str | None = None  # why this file has no critique


@dataclass(frozen=True)
class CaptionSummary:
    out: Path
    rows: list[CaptionRow]
    run: str
    wall_s: float

    def line(self) -> str:
        bad = [r for r in self.rows if r.error]
        stored = sum(r.saliency == "store" for r in self.rows)
        return (f"caption: {len(self.rows) - len(bad)} captioned, {len(bad)} failed, {stored} saliency maps from the "
                f"store, with {self.run} in {self.wall_s:.1f} s -> {self.out / 'captions.jsonl'}, "
                f"{self.out / 'index.html'}")


def _bad_name(path: str) -> CaptionRow:
    return CaptionRow(printable(path), error="bad_filename: the path is not valid UTF-8 (rename it, e.g. with "
                                             "`convmv -f latin1 -t utf8 --notest`)")


def expand_paths(paths: list[Path]) -> tuple[list[Path], list[CaptionRow]]:
    """Image files named or found in folders (ingest's rule), sorted and unique; missing paths and names that
    are not valid UTF-8 as error rows."""
    files: dict[Path, None] = {}
    errors = []
    for p in map(Path, paths):
        if p.is_dir():
            found = find_images(p)
            if not found.images and not found.bad_names:
                errors.append(CaptionRow(printable(str(p)), error="no_images: folder holds no image files"))
            errors += [_bad_name(str(p / bad)) for bad in found.bad_names]
            for f in (p / rel for rel in found.images):
                if is_utf8(str(f)):
                    files[f] = None
                else:  # the folder's own name is not UTF-8
                    errors.append(_bad_name(str(f)))
        elif not is_utf8(str(p)):
            errors.append(_bad_name(str(p)))
        elif p.exists():
            files[p] = None
        else:
            errors.append(CaptionRow(str(p), error=f"missing_image: {p} does not exist"))
    return sorted(files), errors


def resolve_run(run: str | None) -> tuple[str, str]:
    """(dataset, run) from ``DATASET/RUN``, a unique ``RUN`` name, or (None) the newest trained run."""
    from stages.report.generate import find_checkpoint

    root = runs_dir("x").parent
    if run and "/" in run:
        dataset, name = run.split("/", 1)
        return dataset, name
    candidates = []
    for d in sorted(root.glob("*/*")) if root.is_dir() else []:
        if d.is_dir() and not is_untrained(d.name) and (run is None or d.name == run):
            try:
                candidates.append((find_checkpoint(d).stat().st_mtime_ns, d.parent.name, d.name))
            except FileNotFoundError:
                continue
    if not candidates:
        what = f"named '{run}'" if run else "at all"
        raise FileNotFoundError(f"no fine-tuned run {what} under {root}: train one with "
                                "`ase-mllm finetune --dataset NAME`, or pass --run DATASET/RUN")
    if run and len(candidates) > 1:
        raise ValueError(f"run '{run}' exists for several datasets ({', '.join(c[1] for c in candidates)}): "
                         f"pass --run DATASET/{run}")
    _, dataset, name = max(candidates)
    return dataset, name


def caption_files(
    paths: list[Path],
    manifest: Manifest,
    out: Path,
    run: str | None = None,
    checkpoint: str | None = None,
    decode: DecodeConfig = DecodeConfig(),
    batch_size: int = 4,
    progress: bool = True,
) -> CaptionSummary:
    """Critique every image under ``paths`` with a fine-tuned run; write the outputs under ``out``."""
    from stages.report.critique import Critic, EatSaliency

    start = time.perf_counter()
    dataset, name = resolve_run(run)
    critic = Critic.load(EatSaliency(manifest), dataset, name, checkpoint, decode)
    return write_captions(critic, paths, out, batch_size, progress, start)


def write_captions(critic: Any, paths: list[Path], out: Path, batch_size: int = 4, progress: bool = True,
                   start: float | None = None) -> CaptionSummary:
    """Critique every image under ``paths`` with a loaded :class:`~stages.report.critique.Critic`; write the
    outputs under ``out``."""
    from tqdm import tqdm

    from stages.report.critique import read_photo
    from stages.report.html import GalleryItem, render_report
    from stages.saliency.overlay import overlay

    start = time.perf_counter() if start is None else start
    files, rows = expand_paths(paths)
    out.mkdir(parents=True, exist_ok=True)
    batch: list[tuple[CaptionRow, Any]] = []

    def flush() -> None:
        for (row, photo), result in zip(batch, critic.critique([p for _, p in batch])):
            row.critique, row.aesthetic_score, row.saliency = result.text, result.score, result.map_source
            heatmap = Path("heatmaps") / f"{Path(row.path).stem}-{photo.sha256[:12]}.png"
            if not (out / heatmap).exists():
                with atomic_path(out / heatmap) as tmp:
                    overlay(photo.image, result.eat_map).save(tmp, format="PNG")
            row.heatmap = str(heatmap)
        batch.clear()

    for path in tqdm(files, desc=f"caption ({critic.name})", unit="img", disable=not progress):
        row = CaptionRow(str(path))
        rows.append(row)
        try:
            batch.append((row, read_photo(path)))
        except (ImageError, OSError) as e:
            row.error = f"{e.reason}: {e.detail}" if isinstance(e, ImageError) else f"unreadable_image: {e}"
            continue
        if len(batch) == batch_size:
            flush()
    flush()
    rows.sort(key=lambda r: r.path)
    _write_outputs(out, rows)
    items = [GalleryItem(Path(r.path), out / r.heatmap, r.critique or "", [], r.aesthetic_score, None, Path(r.path).name)
             for r in rows if not r.error]
    render_report(out, f"ASE-MLLM critiques ({critic.run}, {critic.checkpoint})", _error_table(rows), items)
    return CaptionSummary(out, rows, critic.name, time.perf_counter() - start)


def _write_outputs(out: Path, rows: list[CaptionRow]) -> None:
    lines = [json.dumps(asdict(r), ensure_ascii=False) for r in rows]
    write_bytes_atomic(out / "captions.jsonl", ("\n".join(lines) + "\n").encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    write_bytes_atomic(out / "captions.csv", buf.getvalue().encode())


def _error_table(rows: list[CaptionRow]) -> dict[str, str]:
    """A Markdown table of the files that could not be captioned (none: no section)."""
    bad = [r for r in rows if r.error]
    if not bad:
        return {}
    lines = ["| File | Error |", "|---|---|"]
    lines += [f"| {r.path.replace('|', '/')} | {r.error.replace('|', '/')} |" for r in bad]
    return {f"{len(bad)} file(s) not captioned": "\n".join(lines) + "\n"}
