"""The saliency feature store: raw LayerCAM maps per image, one store per EAT fingerprint.

Layout of ``saliency_root()/<fingerprint>/`` (the architecture document, pipeline/ARCHITECTURE.md)::

    store.zarr/          Zarr v3 group; rows allocated in whole shards of ``shard_rows``
      maps/              [N, h, w] float32 raw M^c (chunk = 1 map, shard = shard_rows maps, zstd: lossless)
      category/          [N] int32 argmax class (-1: row holds no map)
      score/             [N] float32 predicted aesthetic score (NaN: row holds no map)
    plan/plan-<first shard>.parquet   rows given to new shards, written before any task runs
    ledger/shard-<id>.parquet         one per finished shard, written (temp + rename) after its data
    index.parquet                     the ledger compacted: sha256 -> row (+ quarantined rows)
    quarantine.parquet                images this stage rejected (QUARANTINE_SCHEMA)

A shard is done exactly when its ledger entry exists; a shard is written by one task in one
assignment; done shards are never rewritten, so readers never race the job, and what a reader has
decompressed of a done shard stays valid. Readers see shards committed after they opened the store
(a miss re-reads the ledger when it changed). Maps are read straight from the shard files in the
calling thread (storage/zarr_shards.py; zarr itself if the layout is not the one written here).
Reads that stay in one shard (sequential reads) get that shard decompressed whole once and kept
(per process, least recently used dropped first); other reads fetch their one map.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from pipeline.paths import models_dir, saliency_root, work_dir
from storage.atomic import write_json_atomic, write_parquet_atomic
from storage.images import sha256_file
from storage.tables import QUARANTINE_SCHEMA
from storage.zarr_shards import ShardFiles, open_shard_files

if TYPE_CHECKING:
    from pipeline.manifest import EatSpec, Manifest

DEFAULT_SHARD_ROWS = 1024
SEQUENTIAL_READS = 2  # after this many reads in a row in one shard, the next decompresses the whole shard and keeps it
SHARD_CACHE_BYTES = 64 << 20  # decompressed shards kept per reader and process (about 80 shards of 1024 14x14 maps)
# File times advance in clock ticks (a few ms locally, up to 2 s on some network or FAT filesystems): a commit in
# the tick of the ledger mtime a reader saw would leave it unchanged, so an index read within this of that mtime is
# read again at the next miss (at most this long after a commit).
LEDGER_CLOCK_NS = 2_000_000_000
PLAN_SCHEMA = pa.schema([("shard", pa.int64()), ("row", pa.int64()), ("sha256", pa.string()), ("source", pa.string())])
LEDGER_SCHEMA = pa.schema(
    [
        ("shard", pa.int64()),
        ("row", pa.int64()),
        ("sha256", pa.string()),
        ("source", pa.string()),  # image path the map was computed from
        ("reason", pa.string()),  # null: map stored; else why the image was quarantined
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class PlannedRow:
    row: int
    sha256: str
    source: str


def resolve_checkpoint(spec: EatSpec) -> Path:
    """The EAT weights to use: the manifest's, else the pipeline-trained ``models/eat_<variant>.safetensors``."""
    path = spec.checkpoint or models_dir() / f"eat_{spec.variant}.safetensors"
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"EAT checkpoint {path} not found: run `ase-mllm train-eat` or set models.eat.checkpoint in the manifest"
        )
    return Path(path)


def checkpoint_sha256(path: Path) -> str:
    """SHA-256 of a checkpoint file, remembered per (path, size, mtime) under ``work/cache``: a 350 MB
    dat_base checkpoint is hashed once, not on every job and store lookup."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}\t{st.st_size}\t{st.st_mtime_ns}"
    memo_path = work_dir() / "cache" / "checkpoint_sha256.json"
    try:
        memo = json.loads(memo_path.read_text())
        if isinstance(memo.get(key), str):
            return memo[key]
    except (OSError, ValueError, AttributeError):  # absent or damaged: it is only a memo
        memo = {}
    digest = sha256_file(path)
    kept = {k: v for k, v in memo.items() if not k.startswith(f"{path}\t") and Path(k.split("\t")[0]).exists()}
    try:
        write_json_atomic(memo_path, {**kept, key: digest})
    except OSError:  # a read-only work dir only costs hashing again
        pass
    return digest


def eat_fingerprint(spec: EatSpec, checkpoint_path: Path, input_size: int = 224) -> str:
    """Store name: ``<variant>-<hash of checkpoint sha256, variant, target layer, classes, input size>``."""
    key = {
        "checkpoint_sha256": checkpoint_sha256(checkpoint_path),
        "variant": spec.variant,
        "target_layer": spec.target_layer,
        "num_classes": spec.num_classes,
        "input_size": input_size,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"{spec.variant}-{digest[:16]}"


_TEMP_PREFIX = ".store.zarr.tmp-"


def _remove_dead_temps(path: Path) -> None:
    """Delete store temp dirs that processes of this host were killed while creating."""
    for tmp in path.glob(f"{_TEMP_PREFIX}{socket.gethostname()}-*"):
        pid = int(tmp.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


Shard = tuple[np.ndarray, np.ndarray, np.ndarray]  # maps [S, h, w], category [S], score [S]


class _ShardCache:
    """One process's decompressed done shards (LRU by bytes) and per-shard labels; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.max_bytes = max_bytes
        self.shards: OrderedDict[int, Shard] = OrderedDict()
        self.labels: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # category, score per shard: 8 B a row, all kept
        self.last_shard, self.run = -1, 0  # the shard of the previous read, reads in a row in it

    def visit(self, shard: int) -> tuple[Shard | None, bool]:
        """(the shard if kept, whether reads stay in it) for a read in ``shard``."""
        with self.lock:
            self.run = self.run + 1 if shard == self.last_shard else 1
            self.last_shard = shard
            kept = self.shards.get(shard)
            if kept is not None:
                self.shards.move_to_end(shard)
            return kept, self.run > SEQUENTIAL_READS

    def keep(self, shard: int, data: Shard) -> None:
        with self.lock:
            self.shards[shard] = data
            while sum(a.nbytes for d in self.shards.values() for a in d) > self.max_bytes and len(self.shards) > 1:
                self.shards.popitem(last=False)


class SaliencyStore:
    """Read maps by image sha256; the saliency job also plans, writes and commits shards through it.

    Cheap to pickle: arrays, the index and the shard cache are (re)made lazily in each process.
    """

    def __init__(self, path: Path, fingerprint: str, map_shape: tuple[int, int], shard_rows: int) -> None:
        self.path, self.fingerprint = Path(path), fingerprint
        self.map_shape, self.shard_rows = map_shape, shard_rows
        self._arrays: dict[str, Any] | None = None
        self._writable = False
        self._index: dict[str, int] | None = None
        self._index_stamp = -1  # the ledger directory's mtime when the index was read
        self._cache: _ShardCache | None = None
        self._files: ShardFiles | None | bool = False  # direct map reads; None: through zarr; False: not looked yet

    @classmethod
    def open(
        cls,
        root: Path,
        fingerprint: str,
        map_shape: tuple[int, int] = (14, 14),
        shard_rows: int = DEFAULT_SHARD_ROWS,
        attributes: dict[str, Any] | None = None,
    ) -> SaliencyStore:
        """Open the store ``root/fingerprint``, creating it when absent (``map_shape``/``shard_rows`` apply then only)."""
        path = Path(root).resolve() / fingerprint
        zpath = path / "store.zarr"
        if not (zpath / "zarr.json").exists():  # build beside, then rename: a killed creation leaves no half store
            _remove_dead_temps(path)
            tmp = path / f"{_TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            attrs = {**(attributes or {}), "fingerprint": fingerprint, "map_shape": list(map_shape), "shard_rows": shard_rows}
            group = zarr.open_group(tmp, mode="w", attributes=attrs)
            h, w = map_shape
            cfg = {"write_empty_chunks": True}
            group.create_array(
                "maps", shape=(0, h, w), chunks=(1, h, w), shards=(shard_rows, h, w), dtype="float32",
                fill_value=0.0, config=cfg,
            )
            group.create_array("category", shape=(0,), chunks=(shard_rows,), dtype="int32", fill_value=-1, config=cfg)
            group.create_array("score", shape=(0,), chunks=(shard_rows,), dtype="float32", fill_value=np.nan, config=cfg)
            try:
                os.replace(tmp, zpath)
            except OSError:  # another process created the store meanwhile: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
                if not (zpath / "zarr.json").exists():
                    raise
        attrs = dict(zarr.open_group(zpath, mode="r").attrs)
        return cls(path, fingerprint, tuple(attrs["map_shape"]), int(attrs["shard_rows"]))

    # ---- reading ---------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None, "_cache": None, "_files": False}

    def _array(self, name: str, write: bool = False) -> Any:
        arrays = self._arrays  # one look: another thread may drop them (index reload) meanwhile
        if arrays is None or (write and not self._writable):
            group = zarr.open_group(self.path / "store.zarr", mode="r+" if write else "r")
            arrays = {k: group[k] for k in ("maps", "category", "score")}
            if write:  # the array config is not persisted: an all-zero map must still be written
                arrays = {k: a.with_config({"write_empty_chunks": True}) for k, a in arrays.items()}
            self._arrays, self._writable = arrays, write
        return arrays[name]

    @property
    def index(self) -> dict[str, int]:
        """sha256 -> row of every stored map (loaded once, reloaded when a miss finds new commits)."""
        if self._index is None:
            self._load_index()
        return self._index

    def _ledger_stamp(self) -> int:
        try:
            return os.stat(self.path / "ledger").st_mtime_ns  # a commit renames a file into it
        except FileNotFoundError:
            return 0

    def _load_index(self) -> None:
        stamp = self._ledger_stamp()  # taken first: a commit while the ledger is read changes it
        if time.time_ns() - stamp < LEDGER_CLOCK_NS:  # a commit in the same clock tick would not: look again
            stamp = -1
        ledger = self.ledger()
        ok = ledger.filter(pc.is_null(ledger["reason"]))
        self._index, self._index_stamp = dict(zip(ok["sha256"].to_pylist(), ok["row"].to_pylist())), stamp
        self._arrays = None  # reopened with their current shape (new shards grow the arrays)

    def lookup(self, sha256: str) -> int | None:
        row = self.index.get(sha256)
        if row is None and self._ledger_stamp() != self._index_stamp:  # shards were committed since: look again
            self._load_index()
            row = self._index.get(sha256)
        return row

    def has(self, sha256: str) -> bool:
        return self.lookup(sha256) is not None

    def __len__(self) -> int:
        return len(self.index)

    def read(self, sha256: str) -> tuple[np.ndarray, int, float]:
        """(map [h, w] float32, category, score) of one image; KeyError if it has no map."""
        row = self.lookup(sha256)
        if row is None:
            raise KeyError(f"no saliency map for image sha256 {sha256} in {self.path}")
        shard, i = divmod(row, self.shard_rows)
        cache = self._shard_cache()
        kept, sequential = cache.visit(shard)
        if kept is None and sequential:
            kept = (self._shard_maps(shard), *self._labels_of(shard, cache))  # decompress it whole, keep it
            cache.keep(shard, kept)
        if kept is not None:
            maps, category, score = kept
            return maps[i].copy(), int(category[i]), float(score[i])
        category, score = self._labels_of(shard, cache)
        files = self._map_files()
        return (files.read_row(shard, i) if files else self._array("maps")[row]), int(category[i]), float(score[i])

    def _shard_cache(self) -> _ShardCache:
        """This process's cache (a forked child starts its own: the parent's lock may have been held)."""
        if self._cache is None or self._cache.pid != os.getpid():
            self._cache = _ShardCache(SHARD_CACHE_BYTES)
        return self._cache

    def _map_files(self) -> ShardFiles | None:
        if self._files is False:
            files = open_shard_files(self.path / "store.zarr" / "maps")
            self._files = files if files is not None and files.shard_rows == self.shard_rows else None
        return self._files

    def _shard_maps(self, shard: int) -> np.ndarray:
        """Every map of a done shard: [S, h, w]."""
        files = self._map_files()
        return files.read_shard(shard) if files else self._array("maps")[self._rows_of(shard)]

    def _rows_of(self, shard: int) -> slice:
        return slice(shard * self.shard_rows, (shard + 1) * self.shard_rows)

    def _labels_of(self, shard: int, cache: _ShardCache) -> tuple[np.ndarray, np.ndarray]:
        """(category [S], score [S]) of a done shard, read once per process."""
        labels = cache.labels.get(shard)
        if labels is None:
            labels = cache.labels[shard] = (self._array("category")[self._rows_of(shard)],
                                            self._array("score")[self._rows_of(shard)])
        return labels

    # ---- ledger ----------------------------------------------------------------------------

    def _ledger_file(self, shard: int) -> Path:
        return self.path / "ledger" / f"shard-{shard:08d}.parquet"

    def _ledger_parts(self) -> tuple[pa.Table | None, list[Path]]:
        """(the compacted index or None, ledger files of shards committed since the last compaction)."""
        index_path = self.path / "index.parquet"
        index = pq.read_table(index_path, schema=LEDGER_SCHEMA) if index_path.exists() else None
        compacted = set(pc.unique(index["shard"]).to_pylist()) if index is not None else set()
        ledger_dir = self.path / "ledger"
        names = sorted(os.listdir(ledger_dir)) if ledger_dir.is_dir() else []
        return index, [ledger_dir / n for n in names
                       if n.startswith("shard-") and n.endswith(".parquet") and int(n[6:14]) not in compacted]

    def ledger(self) -> pa.Table:
        """Every done shard's rows: the compacted index plus entries written since."""
        index, since = self._ledger_parts()
        parts = ([index] if index is not None else []) + [pq.read_table(f, schema=LEDGER_SCHEMA) for f in since]
        return pa.concat_tables(parts) if parts else LEDGER_SCHEMA.empty_table()

    def is_compacted(self) -> bool:
        """Whether ``index.parquet`` already holds every committed shard."""
        index, since = self._ledger_parts()
        return index is not None and not since

    def compact(self) -> None:
        """Rewrite ``index.parquet`` and ``quarantine.parquet`` from the ledger."""
        ledger = self.ledger().sort_by("row")
        write_parquet_atomic(self.path / "index.parquet", ledger)
        bad = ledger.filter(pc.is_valid(ledger["reason"]))
        quarantine = pa.table(
            {"source": bad["source"], "image_id": bad["sha256"], "reason": bad["reason"], "detail": bad["detail"]},
            schema=QUARANTINE_SCHEMA,
        )
        write_parquet_atomic(self.path / "quarantine.parquet", quarantine)
        self._index = None

    # ---- writing (the saliency job) --------------------------------------------------------

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """One job per store at a time; the OS drops the lock when the holder dies."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".writer.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"another saliency job is writing {self.path}") from None
            yield

    def planned(self) -> pa.Table:
        plan_dir = self.path / "plan"
        parts = [pq.read_table(plan_dir / n, schema=PLAN_SCHEMA) for n in sorted(os.listdir(plan_dir))
                 if n.endswith(".parquet")] if plan_dir.is_dir() else []
        return pa.concat_tables(parts) if parts else PLAN_SCHEMA.empty_table()

    def done_shards(self) -> set[int]:
        return set(pc.unique(self.ledger()["shard"]).to_pylist())

    def pending_shards(self, plan: pa.Table | None = None) -> dict[int, list[PlannedRow]]:
        """Planned shards without a ledger entry, with their rows (in plan order)."""
        plan = self.planned() if plan is None else plan
        done = self.done_shards()
        pending: dict[int, list[PlannedRow]] = {}
        for shard, row, sha, source in zip(*(plan[c].to_pylist() for c in PLAN_SCHEMA.names)):
            if shard not in done:
                pending.setdefault(shard, []).append(PlannedRow(row, sha, source))
        return pending

    def plan(self, items: list[tuple[str, str]]) -> dict[int, list[PlannedRow]]:
        """Give ``(sha256, source)`` items rows in fresh shards; persist the plan before returning it."""
        if not items:
            return {}
        s = self.shard_rows
        first = self._array("maps", write=True).shape[0] // s
        n_shards = -(-len(items) // s)
        for name in ("maps", "category", "score"):
            arr = self._array(name, write=True)
            arr.resize(((first + n_shards) * s, *arr.shape[1:]))
        rows = np.arange(len(items)) + first * s
        table = pa.table(
            {"shard": rows // s, "row": rows, "sha256": [i[0] for i in items], "source": [i[1] for i in items]},
            schema=PLAN_SCHEMA,
        )
        write_parquet_atomic(self.path / "plan" / f"plan-{first:08d}.parquet", table)
        out: dict[int, list[PlannedRow]] = {}
        for row, (sha, source) in zip(rows.tolist(), items):
            out.setdefault(row // s, []).append(PlannedRow(row, sha, source))
        return out

    def write_shard(self, shard: int, maps: np.ndarray, category: np.ndarray, score: np.ndarray) -> None:
        """Write one whole shard in one assignment per array: maps [S,h,w], category [S], score [S]."""
        s = self.shard_rows
        assert maps.shape == (s, *self.map_shape) and category.shape == score.shape == (s,)
        window = slice(shard * s, (shard + 1) * s)
        self._array("maps", write=True)[window] = maps.astype(np.float32, copy=False)
        self._array("category", write=True)[window] = category.astype(np.int32, copy=False)
        self._array("score", write=True)[window] = score.astype(np.float32, copy=False)

    def commit_shard(self, shard: int, entries: pa.Table) -> None:
        """Mark a written shard done: its ledger entry (LEDGER_SCHEMA rows), atomically."""
        write_parquet_atomic(self._ledger_file(shard), entries.cast(LEDGER_SCHEMA))


def eat_store_fingerprint(manifest: Manifest) -> tuple[str, Path]:
    """(fingerprint, checkpoint path) of the manifest's EAT: which store holds its maps."""
    from pipeline.manifest import EAT_INPUT_SIZE

    checkpoint = resolve_checkpoint(manifest.eat)
    return eat_fingerprint(manifest.eat, checkpoint, EAT_INPUT_SIZE), checkpoint


def current_store(manifest: Manifest) -> SaliencyStore:
    """The store for the manifest's EAT, for the stages that read maps."""
    fingerprint, _ = eat_store_fingerprint(manifest)
    if not (saliency_root() / fingerprint / "store.zarr" / "zarr.json").exists():
        raise FileNotFoundError(
            f"no saliency maps for this EAT ({saliency_root() / fingerprint}): run `ase-mllm saliency` first"
        )
    return SaliencyStore.open(saliency_root(), fingerprint)


def find_store(manifest: Manifest | None) -> tuple[SaliencyStore | None, str]:
    """(the current store, "") or (None, why there is none) for the stages that can do without."""
    if manifest is None:
        return None, "no manifest"
    try:
        return current_store(manifest), ""
    except (FileNotFoundError, LookupError) as e:
        return None, str(e)
