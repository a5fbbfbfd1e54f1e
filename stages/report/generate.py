"""Critique generation with a run's checkpoint: batched, left-padded, KV-cached, resumable.

Images are sorted by prompt length (tile count) so a batch carries little padding; prompts are
left-padded so every sequence ends at the same position and ``model.generate`` (KV cache) appends
to all of them at once (the run family's captioner: the loop in stages/families/captioner.py).

Predictions live in ``runs/<dataset>/<run>/predictions/<checkpoint>[@<decoding>]/``: parquet part
files (image_id, split, caption), each written temp + rename, plus ``generation.json`` (checkpoint
fingerprint, decoding, tiling); each part's name carries a hash of those settings, so parts of
other weights or settings are never read and are deleted as stale. A killed run loses at most
the part being written; a rerun generates only the images without a prediction. Under torchrun
rank r takes images r::world of the split sorted by id (no communication; independent of what is
already done) and writes its own parts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.manifest import Manifest
from pipeline.paths import runs_dir
from stages.families.captioner import Captioner, DecodeConfig
from storage.atomic import write_json_atomic, write_parquet_atomic
from storage.images import ImageError

PREDICTION_SCHEMA = pa.schema([("image_id", pa.string()), ("split", pa.string()), ("caption", pa.string())])


# ---------------------------------------------------------------- runs and checkpoints


def is_untrained(run: str) -> bool:
    """Whether ``run`` names a base family's run of its base model without fine-tuning (the baseline row):
    ``untrained`` (InternVL), ``untrained-qwen2.5-vl``."""
    from stages.families import FAMILIES

    return run in {f.untrained_run for f in FAMILIES.values()}


def run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def find_checkpoint(run_dir: Path, checkpoint: str | None = None) -> Path:
    """``checkpoint`` (a name in the run dir or a path), else ``final/``, else the newest complete ``checkpoint-N``."""
    from stages.finetune.train import is_complete, is_sharded, last_checkpoint

    if checkpoint:
        path = Path(checkpoint) if Path(checkpoint).is_absolute() else run_dir / checkpoint
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
    elif (run_dir / "final" / "config.json").exists():
        return run_dir / "final"
    else:
        path = last_checkpoint(run_dir)
        if path is None or not is_complete(path):
            raise FileNotFoundError(f"no checkpoint in {run_dir}: run `ase-mllm finetune --dataset "
                                    f"{run_dir.parent.name} --run {run_dir.name}` first")
    if is_sharded(path):
        raise FileNotFoundError(f"{path} holds per-rank FSDP / ZeRO-3 shards, not a model: rerun the same `finetune` "
                                "command to finish the run (it resumes there) and write final/")
    return path


def checkpoint_fingerprint(path: Path) -> str:
    """Cheap identity of a checkpoint's weights (names, sizes and mtimes of its weight files)."""
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".json") and p.is_file()
                   and ("model" in p.name or p.name == "config.json"))
    key = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps([str(Path(path).resolve()), key]).encode()).hexdigest()[:16]


def _tokenizer_for(ckpt: Path, run_dir: Path, cfg: dict[str, Any]) -> Any:
    from stages import families

    for directory in (ckpt, run_dir / "tokenizer", Path(cfg["base"]) if cfg.get("base") else None):
        if directory is not None and (directory / "tokenizer_config.json").exists():
            return families.of_run(cfg).load_tokenizer(directory)
    raise FileNotFoundError(f"no tokenizer for {ckpt} (looked in the checkpoint, {run_dir / 'tokenizer'} and the base)")


def placement(device: torch.device | None) -> tuple[torch.device, dict[str, Any]]:
    """(device, from_pretrained arguments): weights load in generation's dtype straight onto the device (a GPU:
    this rank's), so no rank holds an fp32 copy of the model in host memory on the way."""
    from stages.families import captioner as shared

    device = device or shared.default_device()
    return device, {"dtype": shared.compute_dtype(device), "device_map": device}


def load_checkpoint(run_dir: Path, ckpt: Path, device: torch.device | None = None) -> Captioner:
    """A run's checkpoint as a :class:`Captioner` (full weights, or LoRA adapters on the run's base)."""
    from stages import families

    cfg = run_config(run_dir)
    base_family = families.of_run(cfg)
    device, where = placement(device)
    if (ckpt / "config.json").exists():
        model = base_family.model_class().from_pretrained(str(ckpt), **where)
    elif (ckpt / "adapter_config.json").exists():
        if not cfg.get("base"):
            raise ValueError(f"{ckpt} holds LoRA adapters on a randomly initialised demo model: they cannot be "
                             "reloaded without their base; train the demo without --lora")
        from peft import PeftModel

        base, _ = base_family.load_base(cfg["base"], fusion=cfg.get("fusion", "cross_attention"), **where)
        model = PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload()
    else:
        raise FileNotFoundError(f"{ckpt} holds no model (config.json or adapter_config.json)")
    spec = base_family.spec_from_run(model.config, cfg)
    return base_family.captioner(model, _tokenizer_for(ckpt, run_dir, cfg), spec, device)


def prepare_untrained(dataset: str, like: str, manifest: Manifest | None) -> Path:
    """``runs/<dataset>/untrained/`` (``untrained-qwen2.5-vl/`` for that family): the model the run ``like``
    started from, before any fine-tuning.

    With a base checkpoint that is the base itself (nothing is copied); for the demo it is the tiny
    model initialised exactly as ``finetune`` initialised it (same seed, tokenizer and fusion),
    saved under ``final/``. Returns the run dir.
    """
    from transformers import set_seed

    from stages import families

    src = runs_dir(dataset) / like
    cfg = run_config(src)
    base_family = families.of_run(cfg)
    run_dir = runs_dir(dataset) / base_family.untrained_run
    base = cfg.get("base") or (str(manifest.mllm.base) if manifest and manifest.mllm.base else None)
    fusion = cfg.get("fusion", "cross_attention")
    info = {"fine_tuned": False, "untrained_of": like, "base": base, "fusion": fusion, "family": base_family.name,
            base_family.spec_key: cfg.get(base_family.spec_key), "tiny_model": cfg.get("tiny_model"),
            "allow_missing_saliency": cfg.get("allow_missing_saliency", False)}
    if base is None and not (run_dir / "final" / "config.json").exists():
        tokenizer = _tokenizer_for(src / "final", src, cfg)
        set_seed(int(cfg.get("seed", 0)))
        model = base_family.build_tiny(cfg.get("tiny_model", "tiny"), tokenizer, fusion)
        tmp = run_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tmp.replace(run_dir / "final")
    if not (run_dir / "run_config.json").exists():
        write_json_atomic(run_dir / "run_config.json", info)
    return run_dir


def load_run(dataset: str, run: str, checkpoint: str | None = None,
             device: torch.device | None = None) -> tuple[Captioner, str, str]:
    """(captioner, checkpoint name, checkpoint fingerprint) of a run; ``untrained`` may mean the base model."""
    from stages import families

    run_dir = runs_dir(dataset) / run
    cfg = run_config(run_dir)
    if is_untrained(run) and cfg.get("base") and checkpoint is None:
        base, base_family = Path(cfg["base"]), families.of_run(cfg)
        device, where = placement(device)
        model, _ = base_family.load_base(base, fusion=cfg.get("fusion", "cross_attention"), **where)
        captioner = base_family.captioner(model, base_family.load_tokenizer(base),
                                          base_family.spec_from_run(model.config, cfg), device)
        return captioner, "base", checkpoint_fingerprint(base)
    ckpt = find_checkpoint(run_dir, checkpoint)
    return load_checkpoint(run_dir, ckpt, device), ckpt.name, checkpoint_fingerprint(ckpt)


# ---------------------------------------------------------------- predictions on disk


def predictions_dir(dataset: str, run: str, checkpoint: str, decode: DecodeConfig = DecodeConfig()) -> Path:
    tag = decode.tag()
    return runs_dir(dataset) / run / "predictions" / (f"{checkpoint}@{tag}" if tag else checkpoint)


def _settings_key(meta: dict[str, Any]) -> str:
    """Short hash of the generation settings; every part file name carries the key it was made under."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]


def _current_key(directory: Path) -> str | None:
    path = Path(directory) / "generation.json"
    return _settings_key(json.loads(path.read_text())) if path.exists() else None


def read_predictions(directory: Path, split: str | None = None) -> dict[str, str]:
    """image_id -> caption over the committed parts of the current settings (of ``split`` when given)."""
    key = _current_key(directory)
    parts = sorted(Path(directory).glob(f"part-{key}-*.parquet")) if key else []
    out: dict[str, str] = {}
    for part in parts:
        t = pq.read_table(part, schema=PREDICTION_SCHEMA)
        for iid, s, cap in zip(t["image_id"].to_pylist(), t["split"].to_pylist(), t["caption"].to_pylist()):
            if split is None or s == split:
                out[iid] = cap
    return out


def _open_predictions(directory: Path, meta: dict[str, Any]) -> str:
    """Create the directory for ``meta``'s settings and return their key.

    Parts made under other weights or settings (another key) are stale and deleted. Every torchrun
    rank may do this at once: a rank only ever deletes other keys' parts, never fresh ones.
    """
    key = _settings_key(meta)
    if _current_key(directory) != key:
        write_json_atomic(directory / "generation.json", meta)
    stale = [p for p in directory.glob("part-*.parquet") if not p.name.startswith(f"part-{key}-")]
    if stale:
        print(f"generate: {directory} held {len(stale)} prediction parts of other weights or settings; regenerating")
    for part in stale:
        part.unlink(missing_ok=True)
    return key


# ---------------------------------------------------------------- the job


@dataclass
class GenerateSummary:
    directory: Path
    generated: int  # by this process now
    reused: int  # already had a prediction
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image_id, reason): left for a rerun
    wall_s: float = 0.0

    def line(self) -> str:
        rate = self.generated / self.wall_s if self.wall_s > 0 else 0.0
        failed = f", {len(self.failed)} failed (e.g. {self.failed[0][0]}: {self.failed[0][1]})" if self.failed else ""
        return (f"generate: {self.generated} generated, {self.reused} reused{failed} in {self.wall_s:.1f} s "
                f"({rate:.2f} img/s) -> {self.directory}")


def _prefetched(items: list[Any], prepare: Callable[[Any], Any], batch_size: int,
                workers: int = 2) -> Iterator[tuple[list[Any], list[Any]]]:
    """(items, prepared) per batch; the next batch is prepared in threads while this one runs."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

    def submit(pool: ThreadPoolExecutor, batch: list[Any]) -> list[Future]:
        return [pool.submit(prepare, it) for it in batch]

    with ThreadPoolExecutor(max(1, workers)) as pool:
        ahead = submit(pool, batches[0]) if batches else []
        for k, batch in enumerate(batches):
            current = ahead
            ahead = submit(pool, batches[k + 1]) if k + 1 < len(batches) else []
            yield batch, [f.result() for f in current]


def split_images(dataset: str, split: str, limit: int | None = None) -> pa.Table:
    """The images table rows of ``split`` sorted by id (the first ``limit`` of them): what generation covers."""
    import pyarrow.compute as pc

    from storage.tables import read_table

    images = read_table(dataset, "images")
    images = images.filter(pc.equal(images["split"], split)).sort_by("image_id")
    return images if limit is None else images.slice(0, limit)


def generate_split(
    dataset: str,
    run: str,
    manifest: Manifest | None,
    split: str = "test",
    checkpoint: str | None = None,
    decode: DecodeConfig = DecodeConfig(),
    batch_size: int = 8,
    part_size: int = 64,
    limit: int | None = None,
    allow_missing_saliency: bool | None = None,
    rank: int | None = None,
    world: int | None = None,
    progress: bool = True,
) -> GenerateSummary:
    """Generate a critique for every image of ``split`` that has none for this checkpoint yet.

    ``part_size`` images (rounded up to whole batches) are committed per part file; ``limit``
    restricts the split to its first N images by id. Under torchrun, ``rank`` / ``world`` default
    to RANK / WORLD_SIZE.
    """
    from tqdm import tqdm

    from storage.images import open_rgb, safe_join
    from storage.tables import image_root

    start = time.perf_counter()
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    if is_untrained(run) and not (runs_dir(dataset) / run / "run_config.json").exists():
        raise FileNotFoundError(f"{runs_dir(dataset) / run} is not prepared: report a fine-tuned run first "
                                "(the untrained baseline starts from that run's initialisation)")
    captioner, ckpt_name, fingerprint = load_run(dataset, run, checkpoint)
    directory = predictions_dir(dataset, run, ckpt_name, decode)
    key = _open_predictions(directory, {"checkpoint_fingerprint": fingerprint, "decode": asdict(decode),
                                        "tiles": asdict(captioner.spec)})

    images = split_images(dataset, split, limit)
    done = read_predictions(directory, split)
    mine = images.to_pylist()[rank::world]  # by position in the whole split: independent of progress
    rows = [r for r in mine if r["image_id"] not in done]
    reused = len(mine) - len(rows)
    cost = {r["image_id"]: captioner.image_cost(r["width"], r["height"]) for r in rows}
    rows.sort(key=lambda r: (-cost[r["image_id"]], r["image_id"]))  # equal lengths batch together, big first

    store = None
    if captioner.needs_saliency and rows:
        store = run_saliency(dataset, run_config(runs_dir(dataset) / run), manifest, allow_missing_saliency)
    root = image_root(dataset)

    def prepare(row: dict[str, Any]) -> Any:
        try:
            img = open_rgb(safe_join(root, row["path"]))
        except ImageError as e:
            return e
        sal = store.read(row["sha256"])[0] if store is not None and store.has(row["sha256"]) else None
        if sal is None and store is not None and not store.allow_missing:
            return ImageError("missing_saliency", f"no saliency map for {row['image_id']}: run `ase-mllm saliency`")
        try:
            return captioner.prepare(img, sal)
        except ImageError as e:  # e.g. an aspect ratio the Qwen2.5-VL processor refuses
            return e

    summary = GenerateSummary(directory, 0, reused)
    pending: list[dict[str, str]] = []

    def commit() -> None:
        if pending:
            name = f"part-{key}-r{rank:03d}-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.parquet"
            write_parquet_atomic(directory / name, pa.Table.from_pylist(pending, schema=PREDICTION_SCHEMA))
            pending.clear()

    desc = f"generate {run}/{ckpt_name}" + (f" rank {rank}/{world}" if world > 1 else "")
    with tqdm(total=len(rows), desc=desc, unit="img", disable=not progress) as bar:
        for batch, prepared in _prefetched(rows, prepare, batch_size):
            ok = [(r, p) for r, p in zip(batch, prepared) if not isinstance(p, ImageError)]  # the family's prompts
            summary.failed += [(r["image_id"], p.reason) for r, p in zip(batch, prepared) if isinstance(p, ImageError)]
            if ok:
                captions = captioner.generate([p for _, p in ok], decode)
                pending += [{"image_id": r["image_id"], "split": split, "caption": c} for (r, _), c in zip(ok, captions)]
                summary.generated += len(ok)
            if len(pending) >= part_size:
                commit()
            bar.update(len(batch))
    commit()
    summary.wall_s = time.perf_counter() - start
    return summary


class _Store:
    """The saliency store (or none), with the policy for images it lacks."""

    def __init__(self, store: Any | None, allow_missing: bool) -> None:
        self.store, self.allow_missing = store, allow_missing

    def has(self, sha: str) -> bool:
        return self.store is not None and self.store.has(sha)

    def read(self, sha: str) -> tuple[np.ndarray, int, float]:
        return self.store.read(sha)


def saliency_store(manifest: Manifest | None, allow_missing: bool, source: str = "eat", dataset: str = "") -> _Store:
    """The run's saliency source (stages/finetune/saliency_source.py), with its policy for images it lacks; a
    MissingSaliencyError without a store unless ``allow_missing``."""
    from stages.finetune.saliency_source import open_saliency

    store, _why = open_saliency(source, dataset, manifest, allow_missing)
    return _Store(store, allow_missing)


def run_saliency(dataset: str, run_cfg: dict[str, Any], manifest: Manifest | None,
                 allow_missing: bool | None = None) -> _Store:
    """The saliency a run reads at generation: its source and its policy for images without a map (``allow_missing``
    overrides the run's; a uniform run needs no map)."""
    source = run_cfg.get("saliency", "eat")
    allow = run_cfg.get("allow_missing_saliency", False) if allow_missing is None else allow_missing
    return saliency_store(manifest, allow or source == "uniform", source, dataset)
