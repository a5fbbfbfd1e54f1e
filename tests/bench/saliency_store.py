"""Saliency store read latency: single-map reads, random and sequential, idle and under CPU load.

    .venv/bin/python tests/bench/saliency_store.py [--shards 48] [--reads 1500] [--load N] [--dir work/bench/store]

Writes a store of ``--shards`` x 1024 maps of 14 x 14 (the default shard size; the EAT map) through
SaliencyStore's own plan / write / commit, then times ``store.read(sha)`` from fresh readers (index
loaded first, as a long-lived reader has it):
  - random order (training's shuffled sampler, generation's tile-count order): a different shard
    almost every read, so each read fetches its one map straight from the shard file; beside it the
    same reads through zarr (the store's fallback path, and its only path before)
  - row order (sequential reads: report galleries, per-split sweeps): each shard is decompressed
    whole once reads stay in it, then served from memory; beside it the same reads with the shard
    cache off (one map per read)
each idle and with ``--load`` busy processes (default one per core) competing for the CPU, two
rounds alternated, p50 / p99 per round. Aim: p50 <= 2 ms under load.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from storage import saliency_store  # noqa: E402
from storage.saliency_store import DEFAULT_SHARD_ROWS, LEDGER_SCHEMA, SaliencyStore  # noqa: E402

SHAPE = (14, 14)


def build(root: Path, shards: int) -> list[str]:
    """A committed store of ``shards`` full shards of smooth random maps; returns the shas in row order."""
    shutil.rmtree(root, ignore_errors=True)
    store = SaliencyStore.open(root, "bench", SHAPE, DEFAULT_SHARD_ROWS)
    shas = [f"{i:064x}" for i in range(shards * DEFAULT_SHARD_ROWS)]
    rng = np.random.default_rng(0)
    for shard, rows in store.plan([(sha, f"/img/{i}.jpg") for i, sha in enumerate(shas)]).items():
        coarse = rng.random((DEFAULT_SHARD_ROWS, 4, 4), dtype=np.float32)
        maps = np.kron(coarse, np.ones((4, 4), np.float32))[:, :14, :14] * 3  # blocky, like LayerCAM's (compressible)
        store.write_shard(shard, maps, rng.integers(0, 10, DEFAULT_SHARD_ROWS), rng.random(DEFAULT_SHARD_ROWS) * 9)
        n = len(rows)
        store.commit_shard(shard, pa.table({"shard": [shard] * n, "row": [r.row for r in rows],
                                            "sha256": [r.sha256 for r in rows], "source": [r.source for r in rows],
                                            "reason": [None] * n, "detail": [None] * n}, schema=LEDGER_SCHEMA))
    return shas


def latency(root: Path, order: list[str], cache: bool, direct: bool) -> tuple[float, float, float]:
    """(p50, p99, mean) ms of ``read`` over ``order`` from a fresh reader; ``cache`` False: one map per read;
    ``direct`` False: through zarr. The mean carries the whole-shard decompressions that p50 / p99 hide."""
    saliency_store.SEQUENTIAL_READS = 2 if cache else 1 << 62
    reader = SaliencyStore.open(root, "bench")
    if not direct:
        reader._files = None  # what the store does for a layout it does not read itself: zarr's own reads
    reader.read(order[-1])  # index loaded, arrays opened
    times = []
    for sha in order:
        start = time.perf_counter()
        reader.read(sha)
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50)) * 1e3, float(np.percentile(times, 99)) * 1e3, float(np.mean(times)) * 1e3


def _burn() -> None:
    while True:
        pass


@contextmanager
def cpu_load(n: int) -> Iterator[None]:
    """``n`` busy processes for the duration (0: none); ended by their own handles."""
    procs = [multiprocessing.get_context("fork").Process(target=_burn, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
            p.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=48, help="store size in shards of 1024 maps")
    parser.add_argument("--reads", type=int, default=1500, help="reads per measurement")
    parser.add_argument("--load", type=int, default=os.cpu_count(), help="busy processes for the loaded runs")
    parser.add_argument("--dir", type=Path, default=Path("work/bench/store"))
    args = parser.parse_args()
    root = args.dir.resolve()
    start = time.perf_counter()
    shas = build(root, args.shards)
    print(f"store: {len(shas)} maps of {SHAPE[0]} x {SHAPE[1]} in {args.shards} shards of {DEFAULT_SHARD_ROWS}, "
          f"written in {time.perf_counter() - start:.1f} s; {args.reads} reads per measurement; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before")
    rng = np.random.default_rng(1)
    random_order = [shas[i] for i in rng.integers(0, len(shas), args.reads)]
    first = int(rng.integers(0, len(shas) - args.reads))
    row_order = shas[first:first + args.reads]
    cases = [("random order", random_order, True, True), ("random order through zarr", random_order, True, False),
             ("row order, shard cache", row_order, True, True),
             ("row order, no cache (one map per read)", row_order, False, True)]
    for round_ in (1, 2):
        for busy in (0, args.load):
            with cpu_load(busy):
                time.sleep(0.5 if busy else 0)
                results = [(name, *latency(root, order, cache, direct)) for name, order, cache, direct in cases]
                load = os.getloadavg()[0]
            state = (f"under load ({busy} busy processes, load average {load:.1f})" if busy
                     else f"no added load (load average {load:.1f})")
            print(f"round {round_}, {state}:")
            for name, p50, p99, mean in results:
                print(f"  {name}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, mean {mean:.3f} ms")
    shutil.rmtree(root, ignore_errors=True)
    print("aim: p50 <= 2 ms under load")


if __name__ == "__main__":
    main()
