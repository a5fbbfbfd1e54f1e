"""The saliency store: layout read back through zarr itself, ledger semantics, the read cache (against the maps
written), pickling/fork/threads, fingerprints."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from pipeline.manifest import EatSpec
from storage.saliency_store import LEDGER_SCHEMA, SaliencyStore, eat_fingerprint, resolve_checkpoint

S = 8  # shard rows
SHAPE = (14, 14)


def _sha(i: int) -> str:
    return f"{i:064x}"


def _fill(store: SaliencyStore, n: int, seed: int, bad: set[int] = frozenset(), commit: bool = True):
    """Plan n images, write each shard with known random data, commit; returns {sha: (map, cat, score)}."""
    rng = np.random.default_rng(seed)
    planned = store.plan([(_sha(seed * 1000 + i), f"/img/{seed}/{i}.jpg") for i in range(n)])
    truth = {}
    for shard, rows in planned.items():
        maps = np.zeros((S, *SHAPE), np.float32)
        cat = np.full(S, -1, np.int32)
        score = np.full(S, np.nan, np.float32)
        for r in rows:
            i = r.row - shard * S
            maps[i] = rng.standard_normal(SHAPE).astype(np.float32) * (0 if i == 1 else 1)  # row 1: all-zero map
            cat[i], score[i] = rng.integers(0, 10), rng.uniform(1, 10)
            truth[r.sha256] = (maps[i].copy(), int(cat[i]), float(score[i]))
        store.write_shard(shard, maps, cat, score)
        if commit:
            entries = pa.table(
                {"shard": [shard] * len(rows), "row": [r.row for r in rows], "sha256": [r.sha256 for r in rows],
                 "source": [r.source for r in rows],
                 "reason": ["not_an_image" if r.row in bad else None for r in rows],
                 "detail": ["boom" if r.row in bad else None for r in rows]},
                schema=LEDGER_SCHEMA,
            )
            store.commit_shard(shard, entries)
    return planned, truth


def test_round_trip_layout_and_all_zero_maps(tmp_path: Path) -> None:
    store = SaliencyStore.open(tmp_path, "fp", SHAPE, S)
    _, truth = _fill(store, 20, seed=1)  # 3 shards, the last one partial
    reader = SaliencyStore.open(tmp_path, "fp")
    assert len(reader) == 20
    for sha, (m, c, s) in truth.items():
        got_m, got_c, got_s = reader.read(sha)
        assert got_m.dtype == np.float32 and np.array_equal(got_m, m)
        assert (got_c, got_s) == (c, pytest.approx(s, rel=1e-7))
    # the layout as zarr itself sees it
    group = zarr.open_group(tmp_path / "fp" / "store.zarr", mode="r")
    maps = group["maps"]
    assert maps.shape == (24, *SHAPE) and maps.dtype == np.float32
    assert maps.chunks == (1, *SHAPE) and maps.shards == (S, *SHAPE)
    assert group["category"].shape == group["score"].shape == (24,)
    # an all-zero map is stored (write_empty_chunks) and reads back as zeros; the shard index (Zarr v3
    # sharding codec: S x (offset, nbytes) uint64 LE + crc32c at the end) marks absent chunks 2**64 - 1
    assert all(np.array_equal(maps[shard * S + 1], np.zeros(SHAPE)) for shard in range(3))
    for k in range(3):
        raw = (tmp_path / "fp" / "store.zarr" / "maps" / "c" / str(k) / "0" / "0").read_bytes()
        index = np.frombuffer(raw[-4 - 16 * S:-4], "<u8").reshape(S, 2)
        assert (index != np.iinfo(np.uint64).max).all()
    with pytest.raises(KeyError):
        reader.read(_sha(999_999))


def test_uncommitted_shard_is_pending_and_invisible(tmp_path: Path) -> None:
    store = SaliencyStore.open(tmp_path, "fp", SHAPE, S)
    _fill(store, 8, seed=1)
    planned, _ = _fill(store, 8, seed=2, commit=False)  # written but no ledger entry: e.g. killed job
    reader = SaliencyStore.open(tmp_path, "fp")
    assert len(reader) == 8 and not any(reader.has(r.sha256) for r in planned[1])
    assert set(reader.pending_shards()) == {1} and reader.done_shards() == {0}
    assert [r.sha256 for r in reader.pending_shards()[1]] == [r.sha256 for r in planned[1]]


def test_plan_grows_in_whole_shards_and_keeps_data(tmp_path: Path) -> None:
    store = SaliencyStore.open(tmp_path, "fp", SHAPE, S)
    p1, t1 = _fill(store, 3, seed=1)
    p2, t2 = _fill(store, 9, seed=2)
    assert sorted(p1) == [0] and sorted(p2) == [1, 2]  # a new run never reuses a partial shard
    assert [r.row for r in p2[1]] == list(range(8, 16))
    reader = SaliencyStore.open(tmp_path, "fp")
    for sha, (m, _, _) in {**t1, **t2}.items():
        assert np.array_equal(reader.read(sha)[0], m)


def test_compact_index_and_quarantine(tmp_path: Path) -> None:
    store = SaliencyStore.open(tmp_path, "fp", SHAPE, S)
    planned, _ = _fill(store, 12, seed=3, bad={2, 9})
    store.compact()
    index = pq.read_table(tmp_path / "fp" / "index.parquet")
    assert sorted(index["row"].to_pylist()) == list(range(12))
    q = pq.read_table(tmp_path / "fp" / "quarantine.parquet").to_pylist()
    assert sorted(r["source"] for r in q) == ["/img/3/2.jpg", "/img/3/9.jpg"] and {r["reason"] for r in q} == {"not_an_image"}
    reader = SaliencyStore.open(tmp_path, "fp")
    assert len(reader) == 10 and reader.lookup(_sha(3002)) is None and reader.lookup(_sha(3003)) == 3
    # ledger entries written after compaction are merged in
    _fill(store, 4, seed=4)
    assert len(SaliencyStore.open(tmp_path, "fp")) == 14


def test_writer_lock_is_exclusive(tmp_path: Path) -> None:
    store = SaliencyStore.open(tmp_path, "fp", SHAPE, S)
    with store.writer_lock():
        with pytest.raises(RuntimeError, match="another saliency job"):
            with SaliencyStore.open(tmp_path, "fp").writer_lock():
                pass
    with store.writer_lock():  # released
        pass


class _MapDataset(torch.utils.data.Dataset):
    def __init__(self, store: SaliencyStore, shas: list[str]) -> None:
        self.store, self.shas = store, shas

    def __len__(self) -> int:
        return len(self.shas)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.store.read(self.shas[i])[0])


def test_readers_in_dataloader_workers_and_after_pickle(tmp_path: Path) -> None:
    store = SaliencyStore.open(tmp_path, "fp", SHAPE, S)
    _, truth = _fill(store, 16, seed=5)
    reader = SaliencyStore.open(tmp_path, "fp")
    shas = sorted(truth)
    reader.read(shas[0])  # arrays opened in the parent before forking
    clone = pickle.loads(pickle.dumps(reader))
    assert np.array_equal(clone.read(shas[3])[0], truth[shas[3]][0])
    loader = torch.utils.data.DataLoader(
        _MapDataset(reader, shas), batch_size=4, num_workers=2, multiprocessing_context="fork"
    )
    got = torch.cat(list(loader))
    assert torch.equal(got, torch.from_numpy(np.stack([truth[s][0] for s in shas])))


def _same(got: tuple, want: tuple) -> bool:
    return np.array_equal(got[0], want[0]) and got[1] == want[1] and got[2] == pytest.approx(want[2], rel=1e-7)


def test_sequential_reads_decompress_each_shard_once_random_reads_do_not(tmp_path: Path) -> None:
    store = SaliencyStore.open(tmp_path, "fp", SHAPE, S)
    planned, truth = _fill(store, 3 * S, seed=6)
    in_row_order = [r.sha256 for shard in sorted(planned) for r in planned[shard]]
    reader = SaliencyStore.open(tmp_path, "fp")
    for sha in in_row_order:
        assert _same(reader.read(sha), truth[sha])
    assert list(reader._cache.shards) == [0, 1, 2]  # decompressed whole once reads stayed in them
    first = reader.read(in_row_order[0])[0]
    first[:] = 7  # callers get their own copy, never the cached shard
    assert _same(reader.read(in_row_order[0]), truth[in_row_order[0]])

    scattered = SaliencyStore.open(tmp_path, "fp")
    for i in range(S):  # round robin over the shards: never two reads in a row in one shard
        for shard in range(3):
            sha = planned[shard][i].sha256
            assert _same(scattered.read(sha), truth[sha])
    assert not scattered._cache.shards  # one map per read: no whole-shard decompression


def test_reader_sees_shards_committed_after_it_opened_and_its_cache_stays_valid(tmp_path: Path) -> None:
    writer = SaliencyStore.open(tmp_path, "fp", SHAPE, S)
    planned, truth = _fill(writer, S, seed=7)
    reader = SaliencyStore.open(tmp_path, "fp")
    for r in planned[0]:  # shard 0 read in order: decompressed and kept
        assert _same(reader.read(r.sha256), truth[r.sha256])
    assert list(reader._cache.shards) == [0]
    for seed in (8, 9):  # new shards committed at once (same clock tick as the reader's index) and later
        later, more = _fill(writer, S + 3, seed=seed)
        truth.update(more)
        new = [r.sha256 for rows in later.values() for r in rows]
        assert all(reader.has(sha) for sha in new) and len(reader) == len(truth)
        for sha in reversed(new):  # rows beyond the arrays' shape when the reader opened them
            assert _same(reader.read(sha), truth[sha])
    for sha, want in truth.items():  # the kept shard and everything else still exact
        assert _same(reader.read(sha), want)
    assert not reader.has(_sha(123_456_789))


def test_a_commit_hidden_by_a_coarse_file_clock_is_still_seen(tmp_path: Path, monkeypatch) -> None:
    import os

    from storage import saliency_store

    monkeypatch.setattr(saliency_store, "LEDGER_CLOCK_NS", 3600 * 10**9, raising=False)
    writer = SaliencyStore.open(tmp_path, "fp", SHAPE, S)
    _fill(writer, S, seed=11)
    reader = SaliencyStore.open(tmp_path, "fp")
    assert len(reader) == S
    ledger = tmp_path / "fp" / "ledger"
    seen = os.stat(ledger)
    later, more = _fill(writer, S, seed=12)
    os.utime(ledger, ns=(seen.st_atime_ns, seen.st_mtime_ns))  # the commit fell in the clock tick the reader saw
    for sha, want in more.items():
        assert reader.has(sha) and _same(reader.read(sha), want)


def test_concurrent_readers_threads_and_forked_workers_get_identical_maps(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = SaliencyStore.open(tmp_path, "fp", SHAPE, S)
    planned, truth = _fill(store, 4 * S, seed=10)
    reader = SaliencyStore.open(tmp_path, "fp")
    in_row_order = [r.sha256 for shard in sorted(planned) for r in planned[shard]]
    shuffled = [in_row_order[i] for i in np.random.default_rng(0).permutation(len(in_row_order))]
    with ThreadPoolExecutor(4) as pool:  # the generate stage prepares batches in threads
        for _ in range(3):
            for order in (in_row_order, shuffled):
                assert all(pool.map(lambda sha: _same(reader.read(sha), truth[sha]), order))
    assert reader._cache.shards  # some shards were kept, by reads that stayed in them
    loader = torch.utils.data.DataLoader(_MapDataset(reader, in_row_order), batch_size=4, num_workers=2,
                                         multiprocessing_context="fork", timeout=60)  # a deadlock fails, not hangs
    with reader._cache.lock:  # workers fork while a thread of the parent holds the cache lock
        batches = iter(loader)
    got = torch.cat(list(batches))  # a child starts its own cache: no deadlock on the copied lock
    assert torch.equal(got, torch.from_numpy(np.stack([truth[sha][0] for sha in in_row_order])))


def test_fingerprint_tracks_every_input(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"weights-a")
    b.write_bytes(b"weights-b")
    spec = EatSpec(variant="tiny", checkpoint=a)
    fp = eat_fingerprint(spec, a)
    assert fp == eat_fingerprint(EatSpec(variant="tiny", checkpoint=tmp_path / "copy"), a)  # content, not path
    others = {
        eat_fingerprint(spec, b),
        eat_fingerprint(EatSpec(variant="nano"), a),
        eat_fingerprint(EatSpec(variant="tiny", target_layer="stages.1"), a),
        eat_fingerprint(EatSpec(variant="tiny", num_classes=1), a),
        eat_fingerprint(spec, a, input_size=448),
    }
    assert fp not in others and len(others) == 5


def test_checkpoint_hash_is_remembered_but_follows_every_change(tmp_path: Path) -> None:
    """The memo never returns a stale hash: a rewritten checkpoint (new bytes, size or mtime) is hashed again."""
    import hashlib
    import os

    from storage.saliency_store import checkpoint_sha256

    ckpt = tmp_path / "eat.safetensors"
    ckpt.write_bytes(b"weights-a")
    assert checkpoint_sha256(ckpt) == hashlib.sha256(b"weights-a").hexdigest()
    assert checkpoint_sha256(ckpt) == hashlib.sha256(b"weights-a").hexdigest()  # from the memo
    st = ckpt.stat()
    ckpt.write_bytes(b"weights-b")  # same size
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert checkpoint_sha256(ckpt) == hashlib.sha256(b"weights-b").hexdigest()
    memo = tmp_path / "work" / "cache" / "checkpoint_sha256.json"
    memo.write_text("[not a dict")  # damaged memo: only costs hashing again
    assert checkpoint_sha256(ckpt) == hashlib.sha256(b"weights-b").hexdigest()


def test_missing_checkpoint_names_the_fix(isolated_work: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train-eat") as e:
        resolve_checkpoint(EatSpec(variant="tiny"))
    assert str(isolated_work / "models" / "eat_tiny.safetensors") in str(e.value)


def test_creation_removes_temps_of_killed_creators_only(tmp_path: Path) -> None:
    """A creator SIGKILLed mid-creation leaves its temp dir; the next creation deletes it, not a live one's."""
    import signal
    import socket
    import subprocess
    import sys

    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        root = tmp_path / "fp"
        dead_tmp = root / f".store.zarr.tmp-{socket.gethostname()}-{victim.pid}"
        live_tmp = root / f".store.zarr.tmp-{socket.gethostname()}-{alive.pid}"
        for d in (dead_tmp, live_tmp):
            (d / "maps").mkdir(parents=True)
        SaliencyStore.open(tmp_path, "fp", (4, 4), 16)
        assert not dead_tmp.exists() and live_tmp.exists()
        assert sorted(p.name for p in root.iterdir()) == sorted([live_tmp.name, "store.zarr"])
    finally:
        alive.kill()
        alive.wait()
