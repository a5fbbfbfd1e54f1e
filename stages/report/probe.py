"""``ase-mllm probe-saliency``: does a trained run's critique depend on where its saliency map points?

On a seeded sample of a split, critiques are generated (greedy by default) with (a) each image's own maps, (b) another
image's maps (a fixed derangement: image i of the sample gets the map of image i+1, the last the first's) and
(c) uniform maps (all ones: no saliency information). The probe counts the critiques of (b) and (c) that
differ from (a) and, where the dataset has ground-truth attributes (the synthetic corpus), scores each set
(stages/report/attributes.py) and makes the model's forced choices under each (stages/report/forced_choice.py:
the attribute values it finds likeliest, every condition centred on the own maps' mean likelihoods so that a
shift the moved maps cause in every image shows, and how many choices change). A run that ignores its map
changes nothing under (b).

Written to ``reports/<dataset>/<run>/probe.json``; each finished condition is kept there with the key of
its inputs (checkpoint fingerprint, map source, sample), so a killed probe redoes only what was missing and a
rerun with nothing new generates nothing.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.manifest import Manifest
from pipeline.paths import reports_dir, runs_dir
from stages.report.generate import DecodeConfig, load_run, run_config
from storage.atomic import write_json_atomic

CONDITIONS = {"own": "own maps", "other": "another image's maps", "uniform": "uniform maps"}


@dataclass
class ProbeSummary:
    path: Path
    run: str
    split: str
    n: int
    changed: dict[str, int]  # condition -> critiques that differ from the own-map critique
    scores: dict[str, dict[str, float]]  # condition -> attribute scores (empty without ground truth)
    forced: dict[str, dict[str, Any]]  # condition -> forced-choice scores + "changed" choices vs own maps
    generated: int  # critiques generated now (0: everything reused)
    wall_s: float

    def line(self) -> str:
        parts = [f"{CONDITIONS[c]} change {self.changed[c]}/{self.n} critiques" for c in ("other", "uniform")]
        if self.scores:
            p = " / ".join(f"{self.scores[c]['macro_precision']:.3f} ({c})" for c in CONDITIONS)
            f = " / ".join(f"{self.forced[c]['accuracy']:.3f} ({c})" for c in CONDITIONS)
            parts += [f"attr P {p}", f"forced choice {f}"]
        return (f"probe-saliency {self.run} ({self.split}, {self.n} images): {'; '.join(parts)}; "
                f"{self.generated} generated in {self.wall_s:.1f} s -> {self.path}")

    def markdown(self) -> str:
        """The probe as a report table."""
        head = "| maps at test time | critiques changed vs own maps |"
        sep = "|---|---|"
        if self.scores:
            head += " attr P | attr R | forced choice | forced choices changed |"
            sep += "---|---|---|---|"
        lines = [f"### Saliency probe: {self.n} {self.split} images, the same weights", "", head, sep]
        for c, label in CONDITIONS.items():
            row = f"| {label} | {'—' if c == 'own' else f'{self.changed[c]}/{self.n}'} |"
            if self.scores:
                changed = "—" if c == "own" else f"{self.forced[c]['changed']}/{self.forced[c]['choices']}"
                row += (f" {self.scores[c]['macro_precision']:.3f} | {self.scores[c]['macro_recall']:.3f} | "
                        f"{self.forced[c]['accuracy']:.3f} | {changed} |")
            lines.append(row)
        lines += ["", "A run that follows its map changes its critiques when the map moves to another image's; "
                      "one that ignores where the map points changes none (`ase-mllm probe-saliency`)."]
        return "\n".join(lines) + "\n"


def sample_rows(rows: list[dict[str, Any]], sample: int, seed: int) -> list[dict[str, Any]]:
    """``sample`` rows of the split (sorted by id) drawn with ``seed``, in id order; all of them if fewer."""
    rows = sorted(rows, key=lambda r: r["image_id"])
    if len(rows) <= sample:
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), sample, replace=False))
    return [rows[i] for i in keep]


def probe_saliency(dataset: str, run: str, manifest: Manifest | None, split: str = "test", sample: int = 48,
                   seed: int = 0, checkpoint: str | None = None, batch_size: int = 8,
                   decode: DecodeConfig = DecodeConfig(), progress: bool = True) -> ProbeSummary:
    """Run the probe of the module docstring (critiques decoded with ``decode``) and write ``probe.json``."""
    import pyarrow.compute as pc
    from tqdm import tqdm

    from stages.report.attributes import attribute_truth
    from stages.report.generate import run_saliency
    from storage.images import ImageError, open_rgb, safe_join
    from storage.tables import image_root, read_table

    start = time.perf_counter()
    if sample < 2:
        raise ValueError(f"--sample must be at least 2 (another image's map needs a second image), got {sample}")
    cfg = run_config(runs_dir(dataset) / run)
    if not cfg:
        raise FileNotFoundError(f"no run {runs_dir(dataset) / run}: train it with `ase-mllm finetune --dataset "
                                f"{dataset} --run {run}` first")
    if cfg.get("fusion", "cross_attention") != "cross_attention":
        raise ValueError(f"run '{run}' was trained without IASC (--fusion {cfg.get('fusion')}): its critiques "
                         "cannot depend on a saliency map")
    images = read_table(dataset, "images")
    root = image_root(dataset)
    rows = []
    for r in sample_rows(images.filter(pc.equal(images["split"], split)).to_pylist(), sample, seed):
        try:
            open_rgb(safe_join(root, r["path"]))
        except ImageError:  # unreadable since ingest: left out of the probe, as generate leaves it without a critique
            continue
        rows.append(r)
    if len(rows) < 2:
        raise ValueError(f"split '{split}' of '{dataset}' has {len(rows)} readable image(s): the probe needs 2")
    captioner, ckpt_name, fingerprint = load_run(dataset, run, checkpoint)
    source = cfg.get("saliency", "eat")
    store = run_saliency(dataset, cfg, manifest)
    allow_missing = store.allow_missing
    missing = [r["image_id"] for r in rows if not store.has(r["sha256"])]
    if missing and not allow_missing:
        raise FileNotFoundError(f"{len(missing)} sampled '{split}' images have no saliency map (e.g. {missing[0]}): "
                                f"run `ase-mllm saliency --dataset {dataset}` first")
    own = [store.read(r["sha256"])[0] if store.has(r["sha256"]) else None for r in rows]  # None: uniform
    maps = {"own": own, "other": own[1:] + own[:1], "uniform": [None] * len(rows)}
    ids = [r["image_id"] for r in rows]

    out = reports_dir(dataset) / run / "probe.json"
    key = hashlib.sha256(json.dumps([fingerprint, source, split, ids, _map_digest(own), asdict(decode)]).encode())
    key = key.hexdigest()[:16]
    previous = json.loads(out.read_text()) if out.exists() else {}
    done: dict[str, list[str]] = previous.get("captions", {}) if previous.get("key") == key else {}
    todo = [c for c in CONDITIONS if c not in done]
    generated = 0
    with tqdm(total=len(todo) * len(rows), desc=f"probe-saliency {run}", unit="img", disable=not progress) as bar:
        for condition in todo:
            captions: list[str] = []
            for i in range(0, len(rows), batch_size):
                prompts = [captioner.prepare(open_rgb(safe_join(root, r["path"])), m)
                           for r, m in zip(rows[i:i + batch_size], maps[condition][i:i + batch_size])]
                captions += captioner.generate(prompts, decode)
                bar.update(len(prompts))
            done[condition] = captions
            generated += len(captions)
            _write(out, key, run, ckpt_name, split, seed, ids, done, {}, {}, {})  # a killed probe keeps this condition

    changed = {c: sum(a != b for a, b in zip(done["own"], done[c])) for c in CONDITIONS}
    truth = attribute_truth(dataset, split)
    scores: dict[str, dict[str, float]] = {}
    forced: dict[str, dict[str, Any]] = {}
    if truth is not None:
        from stages.report.attributes import attribute_scores
        from stages.report.forced_choice import (candidates, forced_choice_scores, forced_choices, image_logprobs,
                                                 prior, split_logprobs)

        scores = {c: attribute_scores(dict(zip(ids, done[c])), truth.values) for c in CONDITIONS}
        logprobs = {c: image_logprobs(captioner, [(i, open_rgb(safe_join(root, r["path"])), m)
                                                  for i, r, m in zip(ids, rows, maps[c])]) for c in CONDITIONS}
        centre = prior(split_logprobs(captioner, dataset, "validation", store))  # the validation split, own maps
        cands = candidates(captioner.tokenizer)
        choices = {c: forced_choices(logprobs[c], cands, centre) for c in CONDITIONS}
        for c in CONDITIONS:
            forced[c] = forced_choice_scores(choices[c], truth.values)
            forced[c]["changed"] = sum(choices[c][i][k] != choices["own"][i][k] for i in ids for k in choices[c][i])
            forced[c]["choices"] = sum(len(choices[c][i]) for i in ids)
    _write(out, key, run, ckpt_name, split, seed, ids, done, changed, scores, forced)
    return ProbeSummary(out, run, split, len(rows), changed, scores, forced, generated, time.perf_counter() - start)


def _map_digest(maps: list[Any]) -> str:
    h = hashlib.sha256()
    for m in maps:
        h.update(b"none" if m is None else np.ascontiguousarray(m, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _write(out: Path, key: str, run: str, checkpoint: str, split: str, seed: int, ids: list[str],
           captions: dict[str, list[str]], changed: dict[str, int], scores: dict[str, dict[str, float]],
           forced: dict[str, dict[str, Any]]) -> None:
    write_json_atomic(out, {"key": key, "run": run, "checkpoint": checkpoint, "split": split, "seed": seed,
                            "image_ids": ids, "conditions": CONDITIONS, "captions": captions,
                            "changed_vs_own": changed, "attribute_scores": scores, "forced_choice": forced})

