"""The pretraining corpus of the demo models: the synthetic generator's unbounded stream, materialised small.

Images are rendered exactly as the demo corpus's (same generator, another seed), JPEG-encoded at the
corpus's quality and decoded again (the demo models see JPEGs), then resized to the models' 224 x 224 input
(whole image, PIL bicubic: EAT's preprocessing and InternVL's one-tile canvas). Stored under
``work/pretrain/corpus-s<seed>-v<generator version>/``:

- ``images.u8`` [N, 224, 224, 3] uint8, a raw memory-mapped array (150 KB per image)
- ``labels.u8`` [N, 224, 224] uint8, each image's subject label map resized like its image (nearest): k + 1 where
  subject k lies, 0 elsewhere (the dense pretraining targets read it; 50 KB per image)
- ``records.jsonl``: per image {index, attributes, subjects, aesthetic, score, scene} (``scene``: what ``render``
  drew)
- ``done/<chunk>.json``: one ledger entry per finished chunk of ``CHUNK`` images (temp + rename)

Chunks render in parallel processes, each writing its own byte range; a killed build resumes from the
ledger and ends byte-identical to an uninterrupted one. Growing N keeps the chunks already done.
"""
from __future__ import annotations

import io
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.paths import work_dir
from stages.synthetic.corpus import GENERATOR_VERSION, JPEG_QUALITY, rngs, annotation, render
from storage.atomic import write_json_atomic

SIZE = 224
CHUNK = 256


@dataclass(frozen=True)
class PretrainCorpus:
    images: np.ndarray  # [N, 224, 224, 3] uint8 (memory-mapped)
    labels: np.ndarray  # [N, 224, 224] uint8 subject label maps (memory-mapped)
    records: list[dict[str, Any]]  # per image: attributes, subjects, aesthetic, score, scene

    def __len__(self) -> int:
        return len(self.records)


def corpus_dir(seed: int) -> Path:
    return work_dir() / "pretrain" / f"corpus-s{seed}-v{GENERATOR_VERSION}"


ARRAYS = {"images.u8": (SIZE, SIZE, 3), "labels.u8": (SIZE, SIZE)}  # file -> shape of one image's entry


def _open(path: Path, n: int, mode: str) -> np.memmap:
    return np.memmap(path, dtype=np.uint8, mode=mode, shape=(n, *ARRAYS[path.name]))


def render_small(index: int, seed: int, with_mask: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """One image as the demo models see it ([224, 224, 3] uint8) and its record (+, when asked, its mask resized
    like EAT's evaluation does, nearest, as a [224, 224] bool array under "mask", and its subject label map
    resized the same way, [224, 224] uint8, under "labels")."""
    ann = annotation(index, seed)
    scene: dict[str, Any] = {}
    image, mask, labels = render(ann, rngs(seed, index)[1], scene)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    with Image.open(io.BytesIO(buf.getvalue())) as jpeg:
        small = np.asarray(jpeg.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    record = {"index": index, "attributes": ann["attributes"], "subjects": ann["subjects"],
              "aesthetic": ann["aesthetic"], "score": ann["score"], "scene": scene}
    if with_mask:
        record["mask"] = np.asarray(Image.fromarray(mask).resize((SIZE, SIZE), Image.Resampling.NEAREST)) > 127
        record["labels"] = np.array(Image.fromarray(labels).resize((SIZE, SIZE), Image.Resampling.NEAREST))
    return small, record


def validation_set(seed: int, start: int, n: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Images ``start .. start + n`` of the stream (beyond the training ones), with masks: [n, 224, 224, 3]."""
    pairs = [render_small(i, seed, with_mask=True) for i in tqdm(range(start, start + n), desc="validation renders",
                                                                    unit="img", leave=False)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def _build_chunk(root: Path, capacity: int, seed: int, chunk: int, n: int, size: int) -> None:
    images, labels = (_open(root / name, capacity, "r+") for name in ARRAYS)
    records = []
    for index in range(chunk * size, min(n, (chunk + 1) * size)):
        images[index], record = render_small(index, seed, with_mask=True)
        labels[index] = record.pop("labels")
        del record["mask"]
        records.append(record)
    images.flush()
    labels.flush()
    write_json_atomic(root / "done" / f"{chunk:05d}.json", records)


def build_corpus(n: int, seed: int = 1, workers: int = 2, chunk_size: int = CHUNK) -> PretrainCorpus:
    """Render (what is missing of) the first ``n`` images of seed ``seed``; returns the corpus.

    ``chunk_size`` must stay the same across the builds of one corpus (the ledger is per chunk)."""
    root = corpus_dir(seed)
    (root / "done").mkdir(parents=True, exist_ok=True)
    per_image = {name: int(np.prod(shape)) for name, shape in ARRAYS.items()}
    have = {name: (root / name).stat().st_size // size if (root / name).exists() else 0
            for name, size in per_image.items()}
    capacity = max(-(-n // chunk_size) * chunk_size, *have.values())
    for name, size in per_image.items():  # grow the arrays; finished chunks keep their bytes
        if have[name] < capacity:
            with open(root / name, "ab") as fh:
                fh.truncate(capacity * size)
    chunks = range(-(-n // chunk_size))
    todo = [c for c in chunks if not _chunk_done(root, c, n, chunk_size)]
    start = time.perf_counter()
    if todo:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            jobs = [pool.submit(_build_chunk, root, capacity, seed, c, n, chunk_size) for c in todo]
            for job in tqdm(jobs, desc=f"pretraining corpus (seed {seed})", unit="chunk"):
                job.result()
        tqdm.write(f"pretraining corpus: {len(todo)} chunks of {chunk_size} rendered in {time.perf_counter() - start:.0f} s "
                   f"-> {root}")
    records = [r for c in chunks for r in json.loads((root / "done" / f"{c:05d}.json").read_text())][:n]
    images, labels = (_open(root / name, capacity, "r")[:n] for name in ARRAYS)
    return PretrainCorpus(images, labels, records)


def _chunk_done(root: Path, chunk: int, n: int, size: int) -> bool:
    """A ledger entry holding every image of the chunk that ``n`` asks for."""
    try:
        records = json.loads((root / "done" / f"{chunk:05d}.json").read_text())
    except (OSError, ValueError):
        return False
    return len(records) >= min(size, n - chunk * size)
