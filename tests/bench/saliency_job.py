"""Saliency job benchmark: distribution overhead and store read latency / size, on the demo corpus.

    .venv/bin/python tests/bench/saliency_job.py [--n 240] [--variant tiny] [--pairs 3] [--dir work/bench/saliency]

Prints, in one run:
  - throughput of the dask job (`--workers 2`) / the in-process loop (`--workers 0`), while computing (first
    shard start to last shard end; aim >= 0.9) and end to end (whole `python -m pipeline saliency` commands
    into a fresh store: interpreter, imports, cluster start-up, model loading included; aim >= 0.7)
  - wall time of `python -m pipeline saliency` rerun when everything is done (aim: a second or two)
  - images/s while computing beside the decode-only rate (sha256 + JPEG/PNG decode + EAT preprocess) of the
    same photos on the same cores, with the decode threads the job uses (the CPU-side ceiling of the job)
  - bytes on disk per map (read latency: tests/bench/saliency_store.py)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare(base: Path, n: int, variant: str) -> Path:
    """Demo corpus + images.parquet + a seeded EAT checkpoint + manifest; returns the manifest path."""
    from safetensors.torch import save_file

    from stages.synthetic.corpus import ANNOTATIONS, generate_corpus
    from stages.saliency.eat import build_eat
    from storage.images import sha256_file
    from storage.tables import IMAGES_SCHEMA

    root = base / "corpus"
    generate_corpus(root, n=n, seed=0)
    records = [json.loads(line) for line in (root / ANNOTATIONS).read_text().splitlines()]
    rows = [{"image_id": r["image_id"], "split": r["split"], "path": r["file"], "width": r["width"],
             "height": r["height"], "sha256": sha256_file(root / r["file"]), "score": None} for r in records]
    tables = base / "datasets" / "demo"
    tables.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), tables / "images.parquet")
    (tables / "meta.json").write_text(json.dumps({"root": str(root.resolve())}))
    torch.manual_seed(0)
    save_file(build_eat(variant).state_dict(), str(base / f"eat_{variant}.safetensors"))
    manifest = base / "manifest.yaml"
    manifest.write_text(
        f"datasets:\n  demo: {{format: synthetic, root: {root.resolve()}}}\n"
        f"models:\n  eat: {{variant: {variant}, checkpoint: {(base / f'eat_{variant}.safetensors').resolve()}}}\n"
    )
    return manifest


def _cli(work: Path, manifest_path: Path, *args: str) -> tuple[float, str]:
    """(wall seconds, stdout) of one `python -m pipeline saliency ...`: interpreter start-up included."""
    env = {**os.environ, "ASE_WORK": str(work), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "--manifest", str(manifest_path), "saliency", *args],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"saliency failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout


def timed_run(base: Path, name: str, manifest_path: Path, workers: int, shard_rows: int) -> tuple[float, float, Path]:
    """One whole command into a fresh work dir, as a user runs it: (wall s, compute-span s, store path)."""
    work = base / name
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base / "datasets", work / "datasets")
    wall, out = _cli(work, manifest_path, "--dataset", "demo", "--workers", str(workers), "--shard-rows", str(shard_rows))
    m = re.search(r"saliency: (\d+) computed.*; ([\d.]+) s computing\) -> (\S+)", out)
    if m is None:
        raise RuntimeError(f"unexpected summary: {out[-500:]}")
    computed, compute_s, store = int(m.group(1)), float(m.group(2)), Path(m.group(3))
    print(f"  {name}: {computed} maps, wall {wall:.2f} s ({computed / wall:.1f} img/s), "
          f"first shard start to last shard end {compute_s:.2f} s ({computed / compute_s:.1f} img/s)")
    return wall, compute_s, store


def decode_rate(paths: list[Path], threads: int) -> float:
    """img/s of what a saliency worker does on the CPU per image (sha256, decode, EAT preprocess) on ``threads``."""
    from concurrent.futures import ThreadPoolExecutor

    from stages.saliency.eat import preprocess
    from storage.images import open_rgb, sha256_file

    def one(p: Path) -> None:
        sha256_file(p)
        preprocess(open_rgb(p))

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, paths))
    return len(paths) / (time.perf_counter() - start)


def rerun_wall(work: Path, manifest_path: Path) -> float:
    """Seconds of a whole `python -m pipeline saliency` with nothing to do (interpreter start-up included)."""
    wall, out = _cli(work, manifest_path)
    assert " 0 computed" in out, out
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=240, help="demo corpus size")
    parser.add_argument("--variant", default="tiny", help="EAT variant (the demo trains 'tiny')")
    parser.add_argument("--dir", type=Path, default=Path("work/bench/saliency"))
    parser.add_argument("--pairs", type=int, default=3, help="alternated loop / dask runs (medians are printed)")
    args = parser.parse_args()
    from stages.saliency.job import auto_shard_rows, cores, decode_threads
    from storage.saliency_store import SaliencyStore

    base = args.dir.resolve()
    manifest = prepare(base, args.n, args.variant)
    shard_rows = auto_shard_rows(args.n, 2)
    print(f"saliency job bench: {args.n} demo images, EAT {args.variant}, shards of {shard_rows}, {os.cpu_count()} cores")
    pairs, rates = [], []
    for i in range(args.pairs):  # alternated, so load from other processes hits both modes alike
        loop_wall, loop_compute, _ = timed_run(base, "loop_in_process", manifest, workers=0, shard_rows=shard_rows)
        dask_wall, dask_compute, store_path = timed_run(base, "dask_2_workers", manifest, workers=2,
                                                        shard_rows=shard_rows)
        rates.append((args.n / loop_compute, args.n / dask_compute))
        pairs.append((loop_compute / dask_compute, loop_wall / dask_wall, dask_wall - dask_compute,
                      loop_wall - loop_compute))
    computing, end_to_end, dask_start, loop_start = (statistics.median(x) for x in zip(*pairs))
    table = pq.read_table(base / "datasets" / "demo" / "images.parquet")
    photos = [base / "corpus" / p for p in table["path"].to_pylist()]  # the photos the job read
    threads = decode_threads(0)
    decode = statistics.median(decode_rate(photos, threads) for _ in range(3))
    loop_rate, dask_rate = (statistics.median(x) for x in zip(*rates))
    print(f"images/s while computing: in-process loop {loop_rate:.1f}, dask 2 workers {dask_rate:.1f}; decode-only "
          f"{decode:.1f} img/s for the same {len(photos)} photos on {threads} decode threads ({cores()} cores; a "
          f"worker gets cores / workers): the job runs at {max(loop_rate, dask_rate) / decode:.0%} of the CPU-side "
          f"ceiling, {decode_rate(photos, 1):.1f} img/s on the single decode thread of before")
    reruns = [rerun_wall(base / "dask_2_workers", manifest) for _ in range(2)]
    store = SaliencyStore.open(store_path.parent, store_path.name)
    n_maps, map_shape = len(store), store.map_shape
    maps_bytes = _dir_bytes(store_path / "store.zarr" / "maps")
    print(f"distribution overhead (median of {args.pairs} alternated pairs): dask / loop throughput = {computing:.3f} "
          f"while computing (aim >= 0.9), {end_to_end:.3f} end to end (aim >= 0.7; incl. {dask_start:.1f} s vs "
          f"{loop_start:.1f} s outside computing: interpreter, imports, cluster, model loading, shutdown); "
          f"pairs: {', '.join(f'{c:.2f}/{e:.2f}' for c, e, _, _ in pairs)}")
    print(f"rerun with nothing to do: `python -m pipeline saliency` {reruns[0]:.2f} s, {reruns[1]:.2f} s wall")
    print(f"store: {maps_bytes / n_maps:.0f} B/map on disk for maps, {_dir_bytes(store_path) / n_maps:.0f} B/map "
          f"for the whole store (index, ledger, category, score); raw float32 map = "
          f"{4 * int(np.prod(map_shape))} B")


if __name__ == "__main__":
    main()
