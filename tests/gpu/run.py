"""GPU check: stage 1, stage 2 and generation speed on one GPU (``tests/gpu/run.sh``; ``--tiny`` on CPU).

(0) preflight: imports every module the check needs and records the versions found, what is missing and what
    is too old (``MIN_VERSIONS``), before anything is measured;
(a) stage 1 (the saliency job, one worker per GPU) with dat_base (random weights) on synthetic photos at
    real sizes: img/s, beside JPEG decode + preprocess alone on the decode threads a worker uses (the bound
    a worker's CPU side sets), on one thread and on all cores;
(b) stage 2 training steps of InternViT-300M + a Qwen2-0.5B-shaped LLM, random weights, through
    ``finetune`` (bf16 autocast, fp32 master weights) on the maps stage 1 wrote (an image without one, when
    stage 1 ran out of time, trains on the uniform map and is counted): tokens/s, peak GPU memory beside the
    memory plan, MFU against the GPU's dense bf16 peak, each sample charged the FLOPs of its own tiles and tokens;
(c) batched generation with the trained weights: new tokens/s.

The clock starts when run.sh starts (``--started``), before any heavy import. Each phase runs in a child process
boxed by wall clock (:data:`BUDGETS`, cut to what is left of :data:`TOTAL_S`; stage 2 and generation also stop
their loops early to report within their box). Scratch (photos, models, the store, the run) lives in a temporary
folder (``--scratch``); ``$OUT`` (``work/`` without $OUT) receives only ``gpu_check.json``, rewritten after every
phase (a failed or killed phase says why), and ``gpu_check.log``, the tail of each phase's output.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "bench"))

TOTAL_S = 300.0  # run.sh's hard stop; the JSON's last write is due MARGIN_S before it
# wall-clock box of each phase on one H100 (16 cores), in run order
BUDGETS = {"preflight": 25.0, "prepare": 65.0, "stage1": 55.0, "stage2": 100.0, "generation": 40.0}
TINY_SLACK = 2.0  # --tiny (CPU, CI): each box this much wider, the whole check still stopped at TOTAL_S
MARGIN_S = 12.0  # stage 2 / generation stop their loops this long before their box closes (saving, writing)
LOG_TAIL = 4000  # characters of each phase's output kept in gpu_check.log
# the oldest versions the code runs with (transformers: mm_encoder_outputs and cache= arrived in 5.18 and 5.24;
# torch: the lent machine's 2.11, tested); pyproject.toml's lower bound for transformers is the same
MIN_VERSIONS = {"torch": "2.11", "transformers": "5.24"}
# what the phases import, third-party first (tests/test_gpu_script.py checks every module a phase loads is here)
PREFLIGHT = ["numpy", "PIL", "psutil", "yaml", "pyarrow", "safetensors", "tokenizers", "torch", "transformers",
             "accelerate", "dask", "distributed", "zarr", "numcodecs", "google_crc32c", "dask.distributed",
             "dateutil",  # loaded while the phases run (by pyarrow's and torch's helpers)
             "pipeline.manifest", "storage.saliency_store", "stages.saliency.job", "stages.finetune.train",
             "stages.finetune.plan", "stages.families.internvl.model", "stages.report.generate", "saliency_job"]

# dense bf16 peak TFLOPS by GPU name (vendor data sheets; SXM parts unless named)
PEAK_BF16 = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
             ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0),
             ("RTX 4090", 165.0), ("RTX 6000 Ada", 364.0), ("A6000", 155.0), ("V100", 125.0), ("T4", 65.0)]
SIZES = [(1600, 1067), (1067, 1600), (2048, 1365), (1024, 768), (1200, 1200)]  # typical critique-site photos
WORDS = ["lovely light", "strong composition", "the horizon is tilted", "colours feel muted",
         "sharp focus on the eyes", "crop tighter on the subject", "nice leading lines", "too much noise"]


def peak_tflops(name: str) -> float | None:
    return next((tf for key, tf in PEAK_BF16 if key in name), None)


def top_level_modules() -> list[str]:
    """Third-party top-level packages loaded in this process (not the standard library, not this repository)."""
    ours = {"pipeline", "stages", "storage", "saliency_job", "run", "__main__"}
    names = {name.split(".")[0] for name in list(sys.modules)}
    return sorted(n for n in names if n not in sys.stdlib_module_names and n not in ours and not n.startswith("_"))


def preflight() -> dict:
    """Import every module of :data:`PREFLIGHT`; the versions found, what is missing or too old, and the device."""
    import importlib
    import importlib.metadata as metadata

    missing: dict[str, str] = {}
    for name in PREFLIGHT:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 (a broken install raises more than ImportError)
            missing[name] = f"{type(e).__name__}: {e}"
    versions = {}
    for dist in ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "huggingface_hub", "numpy",
                 "dask", "distributed", "zarr", "numcodecs", "pyarrow", "pillow", "tensorboard"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    from packaging.version import Version

    too_old = {d: f"{versions[d]} found, needs >= {v}" for d, v in MIN_VERSIONS.items()
               if versions[d] and Version(versions[d]).release < Version(v).release}
    result: dict[str, Any] = {"python": sys.version.split()[0], "versions": versions, "missing": missing,
                              "too_old": too_old, "modules": top_level_modules(),
                              "carried": os.environ.get("ASE_GPU_CHECK_SITE")}
    if "torch" not in missing:
        import torch

        cuda = torch.cuda.is_available()
        result.update(device=torch.cuda.get_device_name() if cuda else "cpu", cuda=cuda,
                      cuda_version=torch.version.cuda, gpus=torch.cuda.device_count())
    if missing or too_old:
        result["error"] = "; ".join([*(f"cannot import {m} ({why})" for m, why in missing.items()),
                                     *(f"{d} {why}" for d, why in too_old.items())])
    return result


def make_photo(args: tuple[Path, int, int, int]) -> tuple[str, int, int]:
    """A smooth random photo-like JPEG (gradients + blobs at 1/4 size, upscaled, + full-size grain), quality 90."""
    import numpy as np
    from PIL import Image

    path, w, h, seed = args
    rng = np.random.default_rng(seed)
    sw, sh = max(1, w // 4), max(1, h // 4)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    img = np.zeros((sh, sw, 3), np.float32)
    for c in range(3):
        img[..., c] = rng.uniform(40, 200) + rng.uniform(-60, 60) * xx / sw + rng.uniform(-60, 60) * yy / sh
    for _ in range(4):
        cx, cy, r = rng.uniform(0, sw), rng.uniform(0, sh), rng.uniform(0.05, 0.3) * min(sw, sh)
        img += (np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(-80, 80, 3))
    smooth = np.asarray(Image.fromarray(img.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
    grain = rng.integers(-10, 11, smooth.shape, dtype=np.int16)  # sensor noise: what makes JPEG decode cost real
    Image.fromarray((smooth + grain).clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path.name, w, h


def prepare(base: Path, n: int, tiny: bool, variant: str) -> Path:
    """Photos + images/comments tables of dataset 'gpu' + a random EAT checkpoint + manifest."""
    from concurrent.futures import ProcessPoolExecutor

    import pyarrow as pa
    import torch
    from safetensors.torch import save_file

    from stages.saliency.eat import build_eat
    from storage.atomic import write_json_atomic, write_parquet_atomic
    from storage.images import sha256_file
    from storage.tables import COMMENTS_SCHEMA, IMAGES_SCHEMA

    root = base / "photos"
    root.mkdir(parents=True, exist_ok=True)
    sizes = [(320, 240), (240, 320), (300, 300)] if tiny else SIZES
    jobs = [(root / f"p{i:05d}.jpg", *sizes[i % len(sizes)], i) for i in range(n)]
    todo = [j for j in jobs if not j[0].exists()]
    with ProcessPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        list(pool.map(make_photo, todo, chunksize=8))
    images, comments = [], []
    for i, (path, w, h, _) in enumerate(jobs):
        images.append({"image_id": f"p{i:05d}", "split": "train", "path": path.name, "width": w, "height": h,
                       "sha256": sha256_file(path), "score": None})
        comments.append({"image_id": f"p{i:05d}", "comment_id": "c0", "aspect": None,
                         "text": f"{WORDS[i % 8].capitalize()}, {WORDS[(3 * i + 1) % 8]}; {WORDS[(5 * i + 2) % 8]}."})
    tables = base / "work" / "datasets" / "gpu"
    write_parquet_atomic(tables / "images.parquet", pa.Table.from_pylist(images, schema=IMAGES_SCHEMA))
    write_parquet_atomic(tables / "comments.parquet", pa.Table.from_pylist(comments, schema=COMMENTS_SCHEMA))
    write_json_atomic(tables / "meta.json", {"root": str(root), "format": "folder"})
    torch.manual_seed(0)
    ckpt = base / f"eat_{variant}.safetensors"
    if not ckpt.exists():
        save_file(build_eat(variant).state_dict(), str(ckpt))
    manifest = base / "manifest.yaml"
    manifest.write_text(f"datasets:\n  gpu: {{format: folder, root: {root}}}\n"
                        f"models:\n  eat: {{variant: {variant}, checkpoint: {ckpt}}}\n")
    return manifest


def stage1(manifest: Path, base: Path, n: int, cuda: bool) -> dict:
    import torch
    from saliency_job import decode_rate  # tests/bench/saliency_job.py

    from pipeline.manifest import load_manifest
    from stages.saliency.job import cores, decode_threads, run_saliency

    workers = torch.cuda.device_count() if cuda else 0
    summary = run_saliency(load_manifest(manifest), ["gpu"], workers=workers, batch_size=32 if cuda else 4)
    paths = sorted((base / "photos").glob("*.jpg"))[:n]
    sample = paths[: min(len(paths), 300)]
    threads = decode_threads(workers)
    return {"images": summary.computed, "workers": workers, "img_s": summary.computed / max(summary.compute_s, 1e-9),
            "wall_s": summary.wall_s, "decode_threads": threads,
            "decode_img_s_worker_threads": decode_rate(sample, threads), "decode_img_s_1_thread": decode_rate(sample, 1),
            "decode_img_s_all_cores": decode_rate(sample, cores())}


def save_base(base: Path, tiny: bool) -> Path:
    """A random-weight base: InternViT-300M + Qwen2-0.5B shape (tiny: the tiny config), with a BPE tokenizer."""
    import pyarrow.parquet as pq
    import torch

    from stages.families.internvl.model import IASInternVLForConditionalGeneration, named_config, tiny_internvl_config
    from stages.families.internvl.tokenizer import IMG_CONTEXT, train_bpe

    out = base / ("base-tiny" if tiny else "base-internvit300m-qwen2-0.5b")
    if (out / "config.json").exists():
        return out
    texts = pq.read_table(base / "work" / "datasets" / "gpu" / "comments.parquet")["text"].to_pylist()
    tok = train_bpe(texts, vocab_size=512)
    config = tiny_internvl_config("tiny", vocab_size=len(tok)) if tiny else named_config("internvit300m-qwen2-0.5b")
    config.image_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT)
    torch.manual_seed(0)
    model = IASInternVLForConditionalGeneration(config)
    model.to(torch.bfloat16).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def sample_flops(config: Any, example: dict, tokens_per_tile: int) -> dict:
    """One training example's model FLOPs (plan.training_flops) from its own tiles, tokens and labelled tokens."""
    from stages.finetune.plan import Setting, training_flops

    tiles = int(example["pixel_values"].shape[0])  # thumbnail included: 1, or 3 and more
    if tiles == 2:
        raise ValueError("2 tiles (no thumbnail) cannot be expressed as a plan Setting")
    text = len(example["input_ids"]) - tiles * tokens_per_tile
    labelled = sum(1 for t in example["labels"] if t != -100)
    setting = Setting(max_tiles=max(1, tiles - 1), text_tokens=text, labelled_tokens=labelled)
    return {"tiles": tiles, "tokens": len(example["input_ids"]), "labelled": labelled,
            "flops": training_flops(config, setting)}


def stage2(base_dir: Path, manifest: Path, tiny: bool, cuda: bool, deadline: float) -> dict:
    import torch
    from transformers import TrainerCallback

    from pipeline.manifest import load_manifest
    from stages.families.internvl.dataset import CritiqueDataset, TileSpec
    from stages.families.internvl.model import tile_size, tokens_per_tile
    from stages.families.internvl.tokenizer import load_tokenizer
    from stages.finetune.plan import load_model_config
    from stages.finetune.train import TrainConfig, finetune

    steps, warmup = (3, 1) if tiny else (30, 5)
    max_tiles, per_device = (4, 2) if tiny else (12, 4)

    class Timer(TrainerCallback):
        """Step end times; stops training MARGIN_S before the phase's box closes (after two timed steps)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            if len(self.times) >= warmup + 2 and time.time() > deadline - MARGIN_S:
                control.should_training_stop = True

    timer = Timer()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(dataset="gpu", run="gpu-check", base=str(base_dir), max_tiles=max_tiles, max_steps=steps,
                      per_device_batch_size=per_device, global_batch_size=per_device, workers=0 if tiny else 8,
                      save_steps=10**6, logging_steps=5, gradient_checkpointing=not tiny, log_sample_ids=True,
                      allow_missing_saliency=True, report_to="none", extra={"save_strategy": "no"})
    summary = finetune(cfg, load_manifest(manifest), callbacks=(timer,))
    peak = torch.cuda.max_memory_allocated() if cuda else None
    # each timed step's examples (sample log), each charged its own tiles and tokens
    config = load_model_config(base_dir)
    per_tile = tokens_per_tile(config)
    tiles = TileSpec(tile_size=tile_size(config), max_tiles=max_tiles, tokens_per_tile=per_tile)
    data = CritiqueDataset("gpu", "train", load_tokenizer(base_dir), tiles, None, allow_missing_saliency=True)
    log = (summary.run_dir / "samples" / "rank0.txt").read_text().splitlines()
    done = len(timer.times)
    timed = [[int(i) for i in line.split()] for line in log[warmup:done]]
    samples = {i: sample_flops(config, data[i], per_tile) for step in timed for i in step}
    tokens = sum(samples[i]["tokens"] for step in timed for i in step)
    seconds = timer.times[done - 1] - timer.times[warmup - 1]
    flops = sum(samples[i]["flops"] for step in timed for i in step) / seconds
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak_tf = peak_tflops(name) if cuda else None
    planned = planned_peak(cfg, config, data.text_tokens, "bf16" if cuda else "fp32")
    return {"steps_timed": len(timed), "per_device": per_device, "max_tiles": max_tiles,
            "images": len(data.items), "missing_maps": summary.missing_saliency,
            "tokens_per_step": tokens / len(timed), "tokens_s": tokens / seconds, "step_s": seconds / len(timed),
            "peak_memory_gb": peak / 1024**3 if peak is not None else None, "plan_gb": planned / 1024**3,
            "model_tflops_s": flops / 1e12, "mfu": flops / (peak_tf * 1e12) if peak_tf else None,
            "gpu_peak_bf16_tflops": peak_tf, "loss": [summary.start_loss, summary.end_loss],
            "samples": [{"id": i, **samples[i]} for i in sorted(samples)]}


def planned_peak(cfg: Any, config: Any, text_tokens: int, compute: str) -> float:
    """The memory plan's per-GPU bytes of this stage-2 setting (what ``finetune`` prints before it starts)."""
    from stages.finetune.plan import Setting, plan

    setting = Setting(max_tiles=cfg.max_tiles, per_device=cfg.per_device_batch_size, strategy=cfg.strategy,
                      gradient_checkpointing=cfg.gradient_checkpointing, trainable=cfg.trainable,
                      text_tokens=text_tokens, labelled_tokens=text_tokens, compute=compute)
    return plan(config, setting).total


def generation(tiny: bool, deadline: float) -> dict:
    import torch
    from PIL import Image

    from stages.report.generate import DecodeConfig, load_run
    from storage.tables import image_root, read_table

    captioner, _, _ = load_run("gpu", "gpu-check")
    batch, new = (2, 8) if tiny else (8, 64)
    rows = read_table("gpu", "images").to_pylist()[: 3 * batch]
    root = image_root("gpu")
    prompts = [captioner.prepare(Image.open(root / r["path"]).convert("RGB"), None) for r in rows]
    decode = DecodeConfig(max_new_tokens=new)
    captioner.generate_ids(prompts[:batch], decode)  # warm-up
    cuda = captioner.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start, produced, batches = time.perf_counter(), 0, 0
    for i in range(batch, len(prompts), batch):
        if batches and time.time() > deadline - MARGIN_S:
            break
        produced += sum(len(ids) for ids in captioner.generate_ids(prompts[i:i + batch], decode))
        batches += 1
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"batch": batch, "batches": batches, "max_new_tokens": new, "new_tokens": produced,
            "tokens_s": produced / seconds}


def phase(name: str, scratch: Path, tiny: bool, images: int | None, deadline: float) -> dict:
    """Run one phase in this process; its numbers, with the third-party modules it loaded."""
    if name == "preflight":
        return preflight()
    import torch

    base = scratch / ("gpu_check_tiny" if tiny else "gpu_check")
    base.mkdir(parents=True, exist_ok=True)
    os.environ["ASE_WORK"] = str(base / "work")
    cuda = torch.cuda.is_available()
    n = images or (8 if tiny else 1500)
    variant = "tiny" if tiny else "dat_base"
    manifest = base / "manifest.yaml"
    if name == "prepare":
        prepare(base, n, tiny, variant)
        save_base(base, tiny)
        result: dict = {"images": n}
    elif name == "stage1":
        result = {"eat": variant, **stage1(manifest, base, n, cuda)}
    elif name == "stage2":
        result = {"model": "tiny" if tiny else "internvit300m-qwen2-0.5b",
                  **stage2(save_base(base, tiny), manifest, tiny, cuda, deadline)}
    else:
        result = generation(tiny, deadline)
    return {**result, "modules": top_level_modules()}


def run_boxed(name: str, argv: list[str], budget: float, result_file: Path, log: Path) -> dict:
    """``name`` in a child process killed (with its own children) when its wall-clock box closes; its output goes
    to ``log``, and a failure's last lines come back in the result."""
    import psutil

    result_file.unlink(missing_ok=True)
    start = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--deadline", str(time.time() + budget),
           "--result", str(result_file), *argv]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=budget)
            killed = False
        except subprocess.TimeoutExpired:
            tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
            for p in tree:
                p.kill()
            psutil.wait_procs(tree, timeout=10)
            proc.wait()
            killed = True
    box = {"budget_s": round(budget, 1), "wall_s": round(time.perf_counter() - start, 1)}
    found = json.loads(result_file.read_text()) if result_file.exists() else {}
    if proc.returncode == 0 and found and "error" not in found:
        return {**found, **box, "status": "done"}
    tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
    why = (f"killed at its {budget:.0f} s box" if killed else f"failed (exit {proc.returncode})" if proc.returncode
           else "failed" if found else "failed: it wrote no result")
    return {**found, **box, "status": why, "error": found.get("error") or tail.strip() or None}


def write_json(path: Path, result: dict) -> None:
    """Atomically (temp + rename): a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


def needs(name: str, result: dict) -> str | None:
    """Why phase ``name`` cannot run after the phases before it (None: it can)."""
    before = {"stage1": "prepare", "stage2": "prepare", "generation": "stage2"}.get(name)
    if before and result[before]["status"] != "done":
        return f"skipped: {before} did not finish"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and a few images (CPU, seconds)")
    parser.add_argument("--images", type=int, default=None, help="stage-1 photos (default 1500; --tiny 8)")
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the check started (run.sh's)")
    parser.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    parser.add_argument("--phase", choices=list(BUDGETS), help=argparse.SUPPRESS)  # internal: one boxed phase
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        try:
            result = phase(args.phase, args.scratch, args.tiny, args.images, args.deadline)
        except BaseException as e:  # noqa: BLE001 (the parent reads why from the result file)
            result = {"error": f"{type(e).__name__}: {e}"}
            write_json(args.result, result)
            raise
        write_json(args.result, result)
        return
    started = args.started or time.time()
    out = Path(os.environ.get("OUT") or REPO / "work")
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("gpu_check_tiny.json" if args.tiny else "gpu_check.json")
    log = out / ("gpu_check_tiny.log" if args.tiny else "gpu_check.log")
    for stale in (path, log):
        stale.unlink(missing_ok=True)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="ase-gpu-check-"))
    scratch.mkdir(parents=True, exist_ok=True)
    argv = (["--tiny"] if args.tiny else []) + (["--images", str(args.images)] if args.images else []) + \
        ["--scratch", str(scratch)]
    result: dict = {"tiny": args.tiny, "cpu_cores": os.cpu_count(), "budgets_s": BUDGETS, "total_limit_s": TOTAL_S}
    try:
        for name, budget in BUDGETS.items():
            left = started + TOTAL_S - MARGIN_S / 4 - time.time()
            why = needs(name, result) or (None if left > 5 else "skipped: no time left")
            if why:
                result[name] = {"budget_s": budget, "status": why}
            else:
                phase_log = scratch / f"{name}.log"
                box = min(budget * (TINY_SLACK if args.tiny else 1), left)  # a shared CI core imports slowly
                result[name] = run_boxed(name, argv, box, scratch / f".{name}.json", phase_log)
                with open(log, "a") as fh:  # the small log that comes back: each phase's last lines
                    fh.write(f"== {name}: {result[name]['status']}\n{phase_log.read_text(errors='replace')[-LOG_TAIL:]}\n")
            if name == "preflight":
                result.update({k: result[name].get(k) for k in ("device", "python", "versions")})
            result["total_s"] = round(time.time() - started, 1)
            write_json(path, result)
            print(f"gpu check: {name} {result[name]['status']} ({result[name].get('wall_s', 0):.0f} of "
                  f"{result[name]['budget_s']:.0f} s, {result['total_s']:.0f} s in all) -> {path}", flush=True)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    report(result, path)
    if any(result[name]["status"] != "done" for name in BUDGETS):
        raise SystemExit(1)


def report(result: dict, path: Path) -> None:
    """The short table."""
    fmt = lambda x, f="{:.1f}": "n/a" if x is None else f.format(x)  # noqa: E731
    print(f"\nGPU check on {result.get('device')} ({result['cpu_cores']} cores), {result['total_s']:.0f} s -> {path}")
    pre, s1, s2, g = result["preflight"], result["stage1"], result["stage2"], result["generation"]
    if pre.get("versions"):
        print(f"  preflight Python {pre['python']}, torch {pre['versions']['torch']}, transformers "
              f"{pre['versions']['transformers']}" + (f"; {pre['error']}" if pre.get("error") else ""))
    if s1["status"] == "done":
        print(f"  stage 1  {s1['images']} photos, EAT {s1['eat']}: {s1['img_s']:.1f} img/s; decode-only "
              f"{s1['decode_img_s_worker_threads']:.1f} img/s on a worker's {s1['decode_threads']} decode threads, "
              f"{s1['decode_img_s_1_thread']:.1f} on 1, {s1['decode_img_s_all_cores']:.1f} on all cores")
    if s2["status"] == "done":
        print(f"  stage 2  {s2['model']}, {s2['max_tiles']} tiles, batch {s2['per_device']}: {s2['tokens_s']:.0f} "
              f"tokens/s, {s2['step_s']:.3f} s/step, peak {fmt(s2['peak_memory_gb'])} GB (plan {s2['plan_gb']:.1f}), "
              f"MFU {fmt(s2['mfu'], '{:.1%}')}, {s2['missing_maps']} of {s2['images']} images without a map")
    if g["status"] == "done":
        print(f"  generate batch {g['batch']}: {g['tokens_s']:.1f} new tokens/s")
    for name in BUDGETS:
        if result[name]["status"] != "done":
            print(f"  {name}: {result[name]['status']}" + (f": {str(result[name].get('error'))[-300:]}"
                                                           if result[name].get("error") else ""))


if __name__ == "__main__":
    main()
