"""The saliency job: maps vs direct LayerCAM, quarantine, dedup, incremental reruns, real SIGKILLs, `show`, overlay."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.manifest import load_manifest
from stages.saliency import job
from stages.saliency.eat import build_eat, load_eat_weights, preprocess, target_layer
from stages.saliency.layercam import layercam
from storage.images import open_rgb, sha256_file
from storage.saliency_store import SaliencyStore
from storage.tables import IMAGES_SCHEMA

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pipeline"]
N_IMAGES = 40
SHARD_ROWS = 4  # 41 rows (40 images + 1 unreadable) -> 11 shards
RUN_ARGS = ["saliency", "--workers", "2", "--shard-rows", str(SHARD_ROWS), "--batch-size", "4"]


@dataclass(frozen=True)
class Corpus:
    base: Path
    manifest: Path
    datasets: Path  # template work/datasets to copy into each run's work dir
    paths: dict[str, Path]  # sha256 -> image (readable ones, deduplicated)


def _write_dataset(datasets: Path, name: str, root: Path, files: list[str]) -> None:
    rows = [{"image_id": Path(f).stem, "split": "test", "path": f, "width": 0, "height": 0,
             "sha256": sha256_file(root / f), "score": None} for f in files]
    out = datasets / name
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), out / "images.parquet")
    (out / "meta.json").write_text(json.dumps({"root": str(root), "format": "folder"}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    base = tmp_path_factory.mktemp("saliency_corpus")
    root = base / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    files = []
    for i in range(N_IMAGES):
        w, h = rng.integers(40, 120, 2)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"img{i:02d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(root / name)
        files.append(name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    shutil.copy(root / "img00.jpg", root / "same_bytes.jpg")  # same content twice: computed once
    datasets = base / "datasets"
    _write_dataset(datasets, "toy", root, [*files, "broken.jpg", "same_bytes.jpg"])
    torch.manual_seed(0)
    model = build_eat("nano")
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(base / "eat_nano.safetensors"))
    manifest = base / "manifest.yaml"
    manifest.write_text(
        f"datasets:\n  toy: {{format: folder, root: {root}}}\n  more: {{format: folder, root: {root}}}\n"
        f"models:\n  eat: {{variant: nano, checkpoint: {base / 'eat_nano.safetensors'}, target_layer: stages.2}}\n"
    )
    return Corpus(base, manifest, datasets, {sha256_file(root / f): root / f for f in files})


def _new_work(corpus: Corpus, where: Path) -> Path:
    work = where / "work"
    shutil.copytree(corpus.datasets, work / "datasets")
    return work


def _store(work: Path) -> SaliencyStore:
    (fp,) = os.listdir(work / "saliency")
    return SaliencyStore.open(work / "saliency", fp)


def _dump(work: Path) -> dict[str, tuple[bytes, int, bytes]]:
    """sha256 -> (map bytes, category, score bytes); asserts every image is in the ledger and plan exactly once."""
    store = _store(work)
    ledger = store.ledger()["sha256"].to_pylist()
    planned = store.planned()["sha256"].to_pylist()
    assert len(ledger) == len(set(ledger)) and len(planned) == len(set(planned))
    out = {}
    for sha in store.index:
        m, c, s = store.read(sha)
        out[sha] = (m.tobytes(), c, np.float32(s).tobytes())
    return out


@pytest.fixture(scope="module")
def reference(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, job.JobSummary]:
    """One uninterrupted run, in this process (1 torch thread, as each dask worker has here)."""
    work = _new_work(corpus, tmp_path_factory.mktemp("reference"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASE_WORK", str(work))
        summary = job.run_saliency(load_manifest(corpus.manifest), ["toy"], workers=0, batch_size=4,
                                   shard_rows=SHARD_ROWS)
    return work, summary


def test_maps_match_direct_layercam(corpus: Corpus, reference: tuple[Path, job.JobSummary]) -> None:
    work, summary = reference
    assert (summary.computed, summary.reused, summary.quarantined) == (N_IMAGES, 0, 1)
    model = build_eat("nano")
    load_eat_weights(model, corpus.base / "eat_nano.safetensors")
    model.requires_grad_(False)
    store = _store(work)
    assert set(store.index) == set(corpus.paths)
    nonzero = 0
    for sha, path in corpus.paths.items():
        out = layercam(model, target_layer(model, "stages.2"), preprocess(open_rgb(path))[None])
        m, c, s = store.read(sha)
        expected = out.maps[0].numpy()
        np.testing.assert_allclose(m, expected, rtol=1e-4, atol=1e-5 * max(1e-6, float(expected.max())))
        logits = out.logits[0].double().numpy()
        assert c == int(np.argmax(logits))
        assert s == pytest.approx(float((np.arange(1, 11) * logits).sum()), rel=1e-5, abs=1e-5)  # sum_i i * out_i
        nonzero += bool(m.any())
    assert nonzero > N_IMAGES // 2  # the comparison is not between empty maps


def test_quarantine_dedup_incremental_and_noop_rerun(
    corpus: Corpus, reference: tuple[Path, job.JobSummary], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    shutil.copytree(reference[0], work)
    monkeypatch.setenv("ASE_WORK", str(work))
    q = pq.read_table(_store(work).path / "quarantine.parquet").to_pylist()
    assert [(Path(r["source"]).name, r["reason"]) for r in q] == [("broken.jpg", "not_an_image")]
    before = _dump(work)

    def no_model_work(task: job.ShardTask) -> job.ShardResult:
        raise AssertionError("a rerun after completion must not compute")

    monkeypatch.setattr(job, "compute_shard", no_model_work)
    manifest = load_manifest(corpus.manifest)
    again = job.run_saliency(manifest, ["toy"], workers=0)
    assert (again.computed, again.reused, again.quarantined) == (0, N_IMAGES, 1)
    monkeypatch.undo()
    monkeypatch.setenv("ASE_WORK", str(work))
    # a second dataset sharing two images with the first: only its new images are computed
    root = corpus.base / "images"
    for i in range(3):
        Image.fromarray(np.full((50, 60, 3), 40 * i, np.uint8)).save(root / f"new{i}.png")
    _write_dataset(work / "datasets", "more", root, ["img01.png", "same_bytes.jpg", "new0.png", "new1.png", "new2.png"])
    more = job.run_saliency(manifest, ["more"], workers=0)
    assert (more.computed, more.reused, more.quarantined) == (3, 2, 0)
    after = _dump(work)
    assert len(after) == N_IMAGES + 3 and all(after[sha] == value for sha, value in before.items())


def _python(code: str, work: Path) -> dict:
    """Run ``code`` in a fresh interpreter with ASE_WORK=work; it prints one JSON line, returned parsed."""
    env = {**os.environ, "ASE_WORK": str(work), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


JOB_THEN_REPORT = """
import json, sys
from pipeline.manifest import load_manifest
from stages.saliency import job
s = job.run_saliency(load_manifest({manifest!r}), ["toy"], workers={workers})
print(json.dumps({{"computed": s.computed, "reused": s.reused, "quarantined": s.quarantined,
                  "imported": sorted(m for m in ("torch", "distributed", "timm") if m in sys.modules)}}))
"""


def test_rerun_with_nothing_to_do_starts_no_cluster_and_no_model(
    corpus: Corpus, reference: tuple[Path, job.JobSummary], tmp_path: Path
) -> None:
    """The done-check comes first: even with --workers 2, a finished job imports neither torch nor dask."""
    work = tmp_path / "work"
    shutil.copytree(reference[0], work)
    (_store(work).path / "index.parquet").unlink()  # as if killed between its last commit and its compaction
    (_store(work).path / "quarantine.parquet").unlink()
    out = _python(JOB_THEN_REPORT.format(manifest=str(corpus.manifest), workers=2), work)
    assert out == {"computed": 0, "reused": N_IMAGES, "quarantined": 1, "imported": []}
    assert _store(work).is_compacted() and _dump(work) == _dump(reference[0])
    q = pq.read_table(_store(work).path / "quarantine.parquet").to_pylist()
    assert [(Path(r["source"]).name, r["reason"]) for r in q] == [("broken.jpg", "not_an_image")]


def test_small_jobs_run_in_this_process_by_default(corpus: Corpus, tmp_path: Path) -> None:
    assert job.choose_workers(None, job.SMALL_JOB_IMAGES - 1) == 0 and job.choose_workers(3, 10) == 3
    assert job.choose_workers(None, job.SMALL_JOB_IMAGES) in (0, *range(2, 1 + (os.cpu_count() or 1)))
    out = _python(JOB_THEN_REPORT.format(manifest=str(corpus.manifest), workers=None), _new_work(corpus, tmp_path))
    assert out["computed"] == N_IMAGES and "distributed" not in out["imported"]
    assert "timm" not in out["imported"]  # EAT needs no timm (whose import pulls in torchvision and torch._dynamo)


def _cli(args: list[str], work: Path, corpus: Corpus, **kw) -> subprocess.Popen:
    env = {**os.environ, "ASE_WORK": str(work), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([*CLI, "--manifest", str(corpus.manifest), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _ledger_entries(work: Path) -> int:
    return len(list(work.glob("saliency/*/ledger/shard-*.parquet")))


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_whole_job_then_rerun_is_bit_identical(
    corpus: Corpus, reference: tuple[Path, job.JobSummary], tmp_path: Path
) -> None:
    rng = np.random.default_rng(1234)
    n_shards = -(-(N_IMAGES + 1) // SHARD_ROWS)
    wait_shards, extra = int(rng.integers(0, n_shards - 3)), float(rng.uniform(0.0, 0.05))  # >= 4 shards to go
    for _ in range(3):  # an unusually fast machine may finish first: then kill earlier
        shutil.rmtree(tmp_path / "work", ignore_errors=True)
        work = _new_work(corpus, tmp_path)
        proc = _cli(RUN_ARGS, work, corpus)
        _wait_for(lambda: (work / "saliency").is_dir() and _ledger_entries(work) >= wait_shards, proc)
        time.sleep(extra)
        os.killpg(proc.pid, signal.SIGKILL)  # driver, scheduler, nannies and workers alike
        proc.communicate()
        if _ledger_entries(work) < n_shards:
            break
        wait_shards, extra = wait_shards // 2, 0.0
    else:
        pytest.fail("every kill came after the job had finished")
    done = len(_store(work).index) if list(work.glob("saliency/*/store.zarr/zarr.json")) else 0
    out = _finish(_cli(RUN_ARGS, work, corpus))
    assert f"{N_IMAGES - done} computed, {done} reused, 1 quarantined" in out  # finished shards are kept
    assert _dump(work) == _dump(reference[0])


@pytest.mark.slow
def test_sigkill_one_worker_job_still_completes(
    corpus: Corpus, reference: tuple[Path, job.JobSummary], tmp_path: Path
) -> None:
    work = _new_work(corpus, tmp_path)
    proc = _cli(RUN_ARGS, work, corpus)
    _wait_for(lambda: _ledger_entries(work) >= 1, proc)
    workers = [p for p in psutil.Process(proc.pid).children()
               if any("spawn_main" in part for part in p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    workers[0].send_signal(signal.SIGKILL)
    assert _ledger_entries(work) < -(-(N_IMAGES + 1) // SHARD_ROWS), "the kill came too late to test anything"
    out = _finish(proc)
    assert f"{N_IMAGES} computed, 0 reused, 1 quarantined" in out
    assert _dump(work) == _dump(reference[0])


def test_show_writes_overlay_of_stored_or_computed_map(
    corpus: Corpus, reference: tuple[Path, job.JobSummary], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer
    from typer.testing import CliRunner

    from pipeline import context
    from stages.saliency.commands import register
    from stages.saliency.overlay import overlay

    monkeypatch.setenv("ASE_WORK", str(reference[0]))
    context.set_manifest_path(corpus.manifest)
    app = typer.Typer()
    register(app)
    sha, path = sorted(corpus.paths.items())[0]
    stored = _store(reference[0]).read(sha)[0]
    result = CliRunner().invoke(app, ["saliency", "show", path.stem, "--dataset", "toy"])
    assert result.exit_code == 0, result.output
    written = Path(result.output.split()[0])
    assert written == reference[0] / "saliency" / "show" / f"{path.stem}.png" and "from the store" in result.output
    img = open_rgb(path)
    assert np.array_equal(np.asarray(Image.open(written)), np.asarray(overlay(img, stored)))
    # an image outside the store is computed on the fly (same map as the store would hold)
    fresh = tmp_path / "outside.png"
    shutil.copy(path, fresh)
    Image.open(fresh).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(fresh)
    result = CliRunner().invoke(app, ["saliency", "show", str(fresh), "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 0 and "computed" in result.output, result.output
    assert Image.open(tmp_path / "o.png").size == Image.open(fresh).size


def test_overlay_against_matplotlib_jet_and_torch_bilinear() -> None:
    import matplotlib

    from stages.saliency.overlay import jet, overlay

    knots = np.arange(256) / 255.0  # matplotlib's 256-entry lookup table is exact at these points
    np.testing.assert_allclose(jet(knots), matplotlib.colormaps["jet"](knots)[:, :3], atol=1e-6)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    saliency = rng.uniform(0.0, 3.0, (14, 14)).astype(np.float32)
    got = np.asarray(overlay(img, saliency), dtype=np.float64) / 255.0
    scaled = (saliency - saliency.min()) / (saliency.max() - saliency.min())
    heat = torch.nn.functional.interpolate(torch.from_numpy(scaled)[None, None], size=(70, 90), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()
    expected = 0.5 * np.asarray(img, dtype=np.float64) / 255.0 + 0.5 * matplotlib.colormaps["jet"](heat)[..., :3]
    # interior (PIL and torch treat the outermost half pixel differently); 8-bit LUT and rounding
    np.testing.assert_allclose(got[4:-4, 4:-4], expected[4:-4, 4:-4], atol=6 / 255)


def test_local_workers_keep_glibc_malloc_defaults() -> None:
    """dask's nanny would export MALLOC_TRIM_THRESHOLD_=65536 (every freed activation buffer goes back
    to the OS and is refaulted next batch); our local workers run without it unless the user sets it."""
    expected = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    with job._cluster(1, None) as client:
        seen = client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_")
    assert list(seen.values()) == [expected]


def test_decode_threads_follow_the_cores_per_worker_and_the_option(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode threads per worker: the cores each worker has (all of them in this process), at least one; the
    option wins. The prefetcher really decodes on that many threads and still yields images in row order."""
    import threading

    from storage.saliency_store import PlannedRow

    assert [job.decode_threads(w, available=16) for w in (0, 1, 2, 8, 32)] == [16, 16, 8, 2, 1]
    assert job.decode_threads(2, option=3, available=16) == 3 and job.decode_threads(0, option=1, available=16) == 1
    assert job.decode_threads(2) == max(1, len(os.sched_getaffinity(0)) // 2)  # this process's share of the cores
    with pytest.raises(ValueError, match="at least 1"):
        job.decode_threads(2, option=0)

    rows = []
    for i in range(9):
        path = tmp_path / f"p{i}.jpg"
        Image.fromarray(np.full((40 + i, 60, 3), 20 * i, np.uint8)).save(path)
        rows.append(PlannedRow(i, sha256_file(path), str(path)))
    seen: set[int] = set()
    real_load = job._load

    def load_and_note_thread(row):  # noqa: ANN001, ANN202
        seen.add(threading.get_ident())
        time.sleep(0.05)  # long enough for the pool's threads to overlap
        return real_load(row)

    monkeypatch.setattr(job, "_load", load_and_note_thread)
    out = list(job._prefetched(tuple(rows), ahead=6, threads=3))
    assert [r.row for r, _ in out] == list(range(9)) and len(seen) == 3
    for row, x in out:
        torch.testing.assert_close(x, preprocess(open_rgb(Path(row.source))), rtol=0, atol=0)
