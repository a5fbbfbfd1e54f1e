"""The distributed saliency job: LayerCAM maps for every ingested image not yet in the store.

The driver lists images (sha256, path), deduplicates by content, plans rows for the new ones
in whole shards (persisted first), and hands each shard to one dask task. A task computes its
images, writes the shard in one assignment and then its ledger entry. A killed worker's task is
retried by dask; a killed job resumes its planned shards with the same rows and batches, so the
result is bit-identical to an uninterrupted run.

Start-up is kept off the critical path: a rerun whose images are all in the ledger returns before
importing torch or starting anything; jobs below :data:`SMALL_JOB_IMAGES` run in this process
unless ``workers`` says otherwise; each process builds the EAT once, and the store's map shape
comes from that same model.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from pipeline.manifest import EatSpec, Manifest
from pipeline.paths import saliency_root
from storage.images import ImageError, open_rgb, sha256_file
from storage.saliency_store import (DEFAULT_SHARD_ROWS, LEDGER_SCHEMA, PlannedRow, SaliencyStore, eat_store_fingerprint,
                                    resolve_checkpoint)

# Below this many images to compute, the job runs in this process (``workers`` None). Measured here (2 cores):
# a local cluster needs ~4-5 s before its first shard (nannies and workers spawn, import torch, build the EAT),
# while in-process torch already uses every core (dask / loop while computing: 0.92 dat_base, 1.31 EAT-tiny),
# so a cluster saves at most ~25 % of EAT-tiny's ~14 ms/image: break-even near 1,300 images, never for dat_base
# on CPU. On a multi-GPU host the loop uses one GPU, but 2,048 images take well under a minute there.
SMALL_JOB_IMAGES = 2048


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to rebuild the EAT (hashable: the per-process model cache key)."""

    variant: str
    checkpoint: str
    target_layer: str
    num_classes: int


@dataclass(frozen=True)
class ShardTask:
    store: SaliencyStore
    shard: int
    rows: tuple[PlannedRow, ...]
    model: ModelSpec
    batch_size: int
    threads: int | None  # torch intra-op threads in the worker; None: leave torch's default
    decode_threads: int = 1  # threads reading, hashing, decoding and preprocessing images ahead of the model


@dataclass(frozen=True)
class ShardResult:
    shard: int
    computed: int
    quarantined: int
    started: float  # time.time() when the task began (model already loaded) and ended
    finished: float


@dataclass(frozen=True)
class JobSummary:
    computed: int  # maps computed by this run
    reused: int  # requested images that already had a map
    quarantined: int  # requested images rejected (this run or before); see quarantine.parquet
    wall_s: float
    compute_s: float  # from the first shard's start to the last shard's end (no start-up, model loading)
    store: Path


# ---- worker side ---------------------------------------------------------------------------

_MODELS: dict[ModelSpec, tuple[Any, Any, Any]] = {}  # per process: spec -> (model, target layer, device)


def _device() -> Any:
    """cuda:<worker index mod GPUs> in a dask worker on a GPU machine, else CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else 0
    except ValueError:  # not inside a dask worker
        index = 0
    return torch.device(f"cuda:{index % torch.cuda.device_count()}")


def load_model(spec: ModelSpec) -> tuple[Any, Any, Any]:
    """The EAT, its LayerCAM target layer and device; built once per process."""
    if spec not in _MODELS:
        from stages.saliency.eat import build_eat, load_eat_weights, target_layer

        model = build_eat(spec.variant, spec.num_classes)
        load_eat_weights(model, Path(spec.checkpoint))
        device = _device()
        model = model.to(device).eval().requires_grad_(False)
        _MODELS[spec] = (model, target_layer(model, spec.target_layer), device)
    return _MODELS[spec]


def _load(row: PlannedRow) -> Any:
    """The image's model input [3,224,224]; ImageError when unreadable or changed since ingest."""
    from stages.saliency.eat import preprocess

    path = Path(row.source)
    try:
        actual = sha256_file(path)
    except OSError as e:
        raise ImageError("missing_image" if isinstance(e, FileNotFoundError) else "unreadable_image", str(e)) from None
    if actual != row.sha256:
        raise ImageError("changed_since_ingest", f"{path}: sha256 {actual} != ingested {row.sha256}; re-run ingest")
    return preprocess(open_rgb(path))


def _try_load(row: PlannedRow) -> Any:
    try:
        return _load(row)
    except ImageError as e:
        return e


def _prefetched(rows: tuple[PlannedRow, ...], ahead: int, threads: int = 1) -> Iterator[tuple[PlannedRow, Any]]:
    """(row, input or ImageError) in row order; ``threads`` threads decode up to ``ahead`` images in advance
    (PIL's decoding and hashlib release the GIL, so they run in parallel)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        window: deque[tuple[PlannedRow, Future]] = deque()
        for row in rows:
            window.append((row, pool.submit(_try_load, row)))
            if len(window) > ahead:
                first, future = window.popleft()
                yield first, future.result()
        while window:
            first, future = window.popleft()
            yield first, future.result()


def _batches(rows: tuple[PlannedRow, ...], size: int, errors: dict[int, ImageError],
             threads: int = 1) -> Iterator[tuple[list[int], Any]]:
    """(rows, inputs [B,3,224,224]) over the readable images, in row order; unreadable ones go to ``errors``."""
    import torch

    batch_rows: list[int] = []
    inputs: list[Any] = []
    for row, loaded in _prefetched(rows, ahead=max(size, 2 * threads), threads=threads):
        if isinstance(loaded, ImageError):
            errors[row.row] = loaded
            continue
        inputs.append(loaded)
        batch_rows.append(row.row)
        if len(inputs) == size:
            yield batch_rows, torch.stack(inputs)
            batch_rows, inputs = [], []
    if inputs:
        yield batch_rows, torch.stack(inputs)


def compute_shard(task: ShardTask) -> ShardResult:
    """Compute, write and commit one whole shard (the unit of work and of crash safety)."""
    import torch

    from stages.saliency.eat import eat_score
    from stages.saliency.layercam import layercam

    if task.threads and torch.get_num_threads() != task.threads:
        torch.set_num_threads(task.threads)
    model, layer, device = load_model(task.model)
    started = time.time()
    store, s = task.store, task.store.shard_rows
    base = task.shard * s
    maps = np.zeros((s, *store.map_shape), np.float32)  # [S,h,w]
    category = np.full(s, -1, np.int32)
    score = np.full(s, np.nan, np.float32)
    errors: dict[int, ImageError] = {}
    for rows, x in _batches(task.rows, task.batch_size, errors, task.decode_threads):
        out = layercam(model, layer, x.to(device))
        local = np.asarray(rows) - base
        maps[local] = out.maps.detach().float().cpu().numpy()
        category[local] = out.category.cpu().numpy()
        score[local] = eat_score(out.logits.detach()).float().cpu().numpy()
    store.write_shard(task.shard, maps, category, score)
    entries = pa.table(
        {
            "shard": [task.shard] * len(task.rows),
            "row": [r.row for r in task.rows],
            "sha256": [r.sha256 for r in task.rows],
            "source": [r.source for r in task.rows],
            "reason": [errors[r.row].reason if r.row in errors else None for r in task.rows],
            "detail": [errors[r.row].detail if r.row in errors else None for r in task.rows],
        },
        schema=LEDGER_SCHEMA,
    )
    store.commit_shard(task.shard, entries)
    return ShardResult(task.shard, len(task.rows) - len(errors), len(errors), started, time.time())


# ---- driver side ---------------------------------------------------------------------------


def requested_images(manifest: Manifest, datasets: list[str] | None) -> dict[str, str]:
    """sha256 -> absolute image path over the ingested datasets (all ingested ones when None)."""
    from storage.tables import image_root, ingested, read_table

    names = datasets or ingested(manifest.datasets)
    if not names:
        raise FileNotFoundError("no ingested dataset: run `ase-mllm ingest NAME` first")
    images: dict[str, str] = {}
    for name in names:
        table = read_table(name, "images")
        root = image_root(name).resolve()
        for sha, rel in zip(table["sha256"].to_pylist(), table["path"].to_pylist()):
            images.setdefault(sha, str(root / rel))
    return images


def map_shape(spec: ModelSpec) -> tuple[int, int]:
    """(h, w) of the target layer's maps: one forward of the job's own model (built once per process)."""
    import torch

    from stages.saliency import INPUT_SIZE
    from stages.saliency.layercam import layercam

    model, layer, device = load_model(spec)
    out = layercam(model, layer, torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, device=device))
    return tuple(out.maps.shape[1:])


def default_workers() -> int:
    """One worker per GPU; on CPU one per core, as many as memory allows (~2 GiB each)."""
    import psutil
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, min(os.cpu_count() or 1, int(psutil.virtual_memory().available // 2**31)))


def auto_shard_rows(n_images: int, workers: int) -> int:
    """About four shards per worker (load balance, resume granularity), a power of two in 16..1024."""
    target = max(1, n_images // (4 * max(1, workers)))
    return min(DEFAULT_SHARD_ROWS, max(16, 1 << (target - 1).bit_length()))


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or a Slurm job's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_threads(workers: int, option: int | None = None, available: int | None = None) -> int:
    """Decode threads per worker: ``option`` when given, else the cores each worker has (``workers`` 0: this
    process alone, all of them). One thread, at tens of ms of CPU per full-size photo, would cap a GPU worker at a
    few dozen images/s."""
    if option is not None:
        if option < 1:
            raise ValueError(f"decode threads must be at least 1, got {option}")
        return option
    return max(1, (available or cores()) // max(1, workers))


def choose_workers(workers: int | None, n_todo: int) -> int:
    """``workers`` when given; else 0 (this process) for fewer than SMALL_JOB_IMAGES images to compute or a
    single-device host, else :func:`default_workers`."""
    if workers is not None:
        return workers
    if n_todo < SMALL_JOB_IMAGES:
        return 0
    n = default_workers()
    return n if n > 1 else 0


def model_spec(spec: EatSpec, checkpoint: Path) -> ModelSpec:
    return ModelSpec(spec.variant, str(checkpoint.resolve()), spec.target_layer, spec.num_classes)


def existing_store(fingerprint: str) -> SaliencyStore | None:
    """The store of this EAT fingerprint when it exists (nothing created, no model imported)."""
    root = saliency_root().resolve()
    if not (root / fingerprint / "store.zarr" / "zarr.json").exists():
        return None
    return SaliencyStore.open(root, fingerprint)


def preload(client: Any, model: ModelSpec) -> tuple[int, int]:
    """Build the EAT on every worker at once (one :func:`map_shape` each, before any shard is handed out), so no
    worker's first task waits for torch and the model; returns the map shape."""
    workers = list(client.nthreads())
    futures = [client.submit(map_shape, model, workers=[w], allow_other_workers=True, pure=False) for w in workers]
    if not futures:  # an external cluster with no worker yet: the first to join answers
        futures = [client.submit(map_shape, model, pure=False)]
    return client.gather(futures)[0]


def create_store(fingerprint: str, model: ModelSpec, shape: tuple[int, int], shard_rows: int) -> SaliencyStore:
    """A new store for ``model`` (the manifest's EAT), maps of ``shape``."""
    from stages.saliency import INPUT_SIZE

    attrs = {"variant": model.variant, "checkpoint": model.checkpoint, "target_layer": model.target_layer,
             "num_classes": model.num_classes, "input_size": INPUT_SIZE}
    return SaliencyStore.open(saliency_root().resolve(), fingerprint, shape, shard_rows, attrs)


def _summary(store: SaliencyStore, images: dict[str, str], fresh: set[str], computed: int,
             spans: list[tuple[float, float]], start: float) -> JobSummary:
    stored = store.index
    reused = sum(1 for sha in images if sha in stored and sha not in fresh)
    quarantined = sum(1 for sha in images if sha not in stored)
    compute_s = max(f for _, f in spans) - min(s for s, _ in spans) if spans else 0.0
    return JobSummary(computed, reused, quarantined, time.perf_counter() - start, compute_s, store.path)


def _finished(store: SaliencyStore, images: dict[str, str], start: float) -> JobSummary | None:
    """The summary when every requested image is already in the ledger (mapped or quarantined), else None.

    Read without the writer lock: ledger entries appear by atomic rename, so what is there is final."""
    import pyarrow.compute as pc

    ledger = store.ledger()
    if not set(images) <= set(ledger["sha256"].to_pylist()):
        return None
    if not store.is_compacted():  # a job killed between its last commit and its compaction
        try:
            with store.writer_lock():
                store.compact()
        except RuntimeError:  # another job is writing: it compacts when it ends
            pass
    stored = set(ledger.filter(pc.is_null(ledger["reason"]))["sha256"].to_pylist())
    reused = sum(1 for sha in images if sha in stored)
    return JobSummary(0, reused, len(images) - reused, time.perf_counter() - start, 0.0, store.path)


@contextmanager
def _cluster(workers: int, scheduler: str | None) -> Iterator[Any]:
    """A dask Client (local cluster of ``workers`` processes, or ``scheduler``); None: run in this process."""
    if scheduler is not None:
        from distributed import Client

        client = Client(scheduler)
        try:
            yield client
        finally:
            client.close()
    elif workers > 0:
        from stages.saliency.local_cluster import local_client

        with local_client(workers) as client:
            yield client
    else:
        yield None


def _results(client: Any, tasks: list[ShardTask]) -> Iterator[ShardResult]:
    """Shard results as they finish; dask retries a task whose worker died."""
    if client is None:
        yield from map(compute_shard, tasks)
        return
    from distributed import as_completed

    futures = [client.submit(compute_shard, t, key=f"saliency-{t.store.fingerprint}-shard-{t.shard}", pure=False)
               for t in tasks]
    for future in as_completed(futures):
        yield future.result()


def run_saliency(
    manifest: Manifest,
    datasets: list[str] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    batch_size: int = 8,
    shard_rows: int | None = None,
    decode: int | None = None,
) -> JobSummary:
    """Compute every requested image's map that the store lacks; resume unfinished shards first.

    ``workers`` 0 computes in this process; None chooses (:func:`choose_workers`). ``shard_rows`` applies when
    the store is created (None: auto). ``decode``: decode threads per worker (None: :func:`decode_threads`;
    with ``scheduler``, this machine's cores over ``workers``).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    images = requested_images(manifest, datasets)
    fingerprint, checkpoint = eat_store_fingerprint(manifest)
    store = existing_store(fingerprint)
    if store is not None and (done := _finished(store, images, start)) is not None:
        return done
    n_todo = len(set(images) - set(store.ledger()["sha256"].to_pylist())) if store is not None else len(images)
    workers = choose_workers(workers, n_todo) if scheduler is None else (workers or 0)
    model = model_spec(manifest.eat, checkpoint)
    readers = decode_threads(workers, decode)
    where = scheduler or (f"{workers} local workers" if workers else "this process")
    where += f", {readers} decode threads" + (" each" if workers else "")
    with _cluster(workers, scheduler) as client:
        shape = preload(client, model) if client is not None else None
        if store is None:
            shape = shape or map_shape(model)  # this process's model, then used by its shards
            store = create_store(fingerprint, model, shape, shard_rows or auto_shard_rows(len(images), workers))
        with store.writer_lock():
            plan = store.planned()
            pending = store.pending_shards(plan)
            known = set(plan["sha256"].to_pylist())
            new = store.plan(sorted((sha, path) for sha, path in images.items() if sha not in known))
            shards = {**pending, **new}
            fresh = {r.sha256 for rows in shards.values() for r in rows}
            threads = None if scheduler or workers == 0 else max(1, cores() // workers)
            tasks = [ShardTask(store, k, tuple(rows), model, batch_size, threads, readers)
                     for k, rows in sorted(shards.items())]
            computed, spans = 0, []
            with tqdm(total=sum(len(t.rows) for t in tasks), unit="img", desc=f"saliency ({where})") as bar:
                for result in _results(client, tasks):
                    computed += result.computed
                    spans.append((result.started, result.finished))
                    bar.update(result.computed + result.quarantined)
            store.compact()
    return _summary(store, images, fresh, computed, spans, start)


def load_manifest_model(manifest: Manifest) -> tuple[Any, Any, Any]:
    """(model, target layer, device) of the manifest's EAT, for maps of single images."""
    return load_model(model_spec(manifest.eat, resolve_checkpoint(manifest.eat)))


def compute_map(loaded: tuple[Any, Any, Any], img: Any) -> tuple[np.ndarray, int, float]:
    """(raw map [h,w], category, score) of one RGB image with a ``load_manifest_model`` result."""
    from stages.saliency.eat import eat_score, preprocess
    from stages.saliency.layercam import layercam

    model, layer, device = loaded
    out = layercam(model, layer, preprocess(img)[None].to(device))  # maps [1, h, w]
    return out.maps[0].cpu().numpy(), int(out.category[0]), float(eat_score(out.logits)[0])


def saliency_of(manifest: Manifest, path: Path, img: Any) -> tuple[np.ndarray, int, float, str]:
    """(map [h,w], category, score, "from the store" | "computed") of one image under the manifest's EAT."""
    from storage.saliency_store import find_store

    store, _ = find_store(manifest)
    sha = sha256_file(path)
    if store is not None and store.has(sha):
        return (*store.read(sha), "from the store")
    return (*compute_map(load_manifest_model(manifest), img), "computed")
