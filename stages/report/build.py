"""``ase-mllm report``: generate what is missing, score it beside the baselines, write the report.

``reports/<dataset>/<run>/``: ``metrics.json`` (+ ``per_image.jsonl``) of the run, ``baselines/
<row>.json`` for every other row, ``table.md`` / ``table.csv`` (Table I layout, paper rows beside
ours), ``ablation.md`` / ``.csv`` (Table II layout, with / without fine-tuning x IASC, from every
run of the dataset), ``predictions.parquet`` and ``index.html`` (gallery + tables).

Incremental throughout: generation only for images without a prediction, scoring skipped when a
row's metrics file already holds the scores of exactly these predictions and references
(``metrics.score_to_file`` keys them by a hash), overlays and thumbnails written once.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.manifest import Manifest
from pipeline.paths import reports_dir, runs_dir, study_dir
from stages import families
from stages.report.generate import DecodeConfig, generate_split, is_untrained, prepare_untrained, read_predictions, \
    run_config, split_images
from stages.report.references import references
from storage.atomic import write_bytes_atomic, write_json_atomic, write_parquet_atomic

UNTRAINED_ROW = "untrained (same model before fine-tuning)"
CONSTANT_ROW = "constant: best critique"
REFERENCE_ROW = "reference critique (ground truth)"


@dataclass
class ReportSummary:
    directory: Path
    rows: dict[str, dict[str, Any]]  # row name -> metrics
    rescored: list[str]  # rows scored this time (the others were unchanged)
    tables: dict[str, str]  # title -> markdown
    index: Path | None
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    probe: str | None = None  # the saliency probe's summary line (runs trained with IASC)

    def line(self) -> str:
        kept = len(self.rows) - len(self.rescored)
        line = (f"report: {len(self.rows)} rows ({len(self.rescored)} scored, {kept} unchanged) in {self.wall_s:.1f} s "
                f"-> {self.directory / 'table.md'}, {self.index or 'no index.html'}")
        return line + (f"\n{self.probe}" if self.probe else "")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def condition(dataset: str, run: str) -> tuple[bool, bool]:
    """(fine-tuned, IASC active) of a run. The untrained model's cross-attention gates are zero: no IASC."""
    cfg = run_config(runs_dir(dataset) / run)
    fine_tuned = cfg.get("fine_tuned", not is_untrained(run))
    return bool(fine_tuned), bool(fine_tuned and cfg.get("fusion", "cross_attention") == "cross_attention")


def ablation_runs(dataset: str, run: str) -> dict[tuple[bool, bool], str]:
    """One run per (fine-tuned, IASC) condition: ``run`` and its family's untrained base, then the newest other
    trained run of the same base family (stages/families/__init__.py)."""
    from stages.finetune.train import is_sharded, last_checkpoint

    base_family = families.of_run(run_config(runs_dir(dataset) / run))
    chosen = {condition(dataset, run): run, (False, False): base_family.untrained_run}
    others = []
    for d in runs_dir(dataset).iterdir() if runs_dir(dataset).is_dir() else []:
        if d.name == run or is_untrained(d.name) or not d.is_dir() or not (d / "run_config.json").exists():
            continue
        if families.of_run(run_config(d)) is not base_family:
            continue
        ckpt = d / "final" if (d / "final" / "config.json").exists() else last_checkpoint(d)
        if ckpt is not None and not is_sharded(ckpt):  # an unfinished FSDP run has no model to report yet
            others.append((ckpt.stat().st_mtime_ns, d.name))
    for _, name in sorted(others, reverse=True):
        chosen.setdefault(condition(dataset, name), name)
    return chosen


def build_report(
    dataset: str,
    run: str,
    manifest: Manifest | None,
    split: str = "test",
    checkpoint: str | None = None,
    decode: DecodeConfig = DecodeConfig(),
    batch_size: int = 8,
    limit: int | None = None,
    spice_lib: Path | None = None,
    baselines: bool = True,
    ablation: bool = True,
    gallery: int = 60,
    progress: bool = True,
    allow_partial: bool = False,
) -> ReportSummary | None:
    """Everything of ``reports/<dataset>/<run>/`` (see the module docstring); returns the summary.

    Under torchrun every rank generates its share of each row's predictions; then rank 0 alone scores the
    complete split and writes the report, and the other ranks return None. A row with images lacking a
    prediction is refused unless ``allow_partial`` (the tables then say how many images each row covers).
    """
    from stages.report.attributes import attribute_scores, attribute_truth
    from stages.report.diversity import diversity
    from stages.report.metrics import score_to_file
    from stages.report.ranks import Ranks
    from stages.report.tables import write_attribute_table, write_tables

    start = time.perf_counter()
    ranks = Ranks.start()
    try:
        untrained = ranks.first(lambda: prepare_untrained(dataset, run, manifest)).name if baselines or ablation else None
        runs_by_condition = ablation_runs(dataset, run) if ablation else {}
        to_generate = {run: checkpoint}
        for name in (untrained, *runs_by_condition.values()):
            if name is not None and name not in to_generate:
                to_generate[name] = None
        directories, failed = {}, {}
        for name, ckpt in to_generate.items():
            g = generate_split(dataset, name, manifest, split, ckpt, decode, batch_size, limit=limit, progress=progress)
            print(g.line())
            directories[name], failed[name] = g.directory, g.failed
        failed = {name: [f for per_rank in ranks.gather(failed) for f in per_rank[name]] for name in failed}
    finally:
        ranks.close()
    if not ranks.main:
        return None

    out = reports_dir(dataset) / run
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    refs = references(dataset, split)
    expected = [i for i in split_images(dataset, split, limit)["image_id"].to_pylist() if i in refs]
    generated = {name: {i: c for i, c in read_predictions(directories[name], split).items() if i in refs}
                 for name in to_generate}
    ours = generated[run]
    if not ours:
        raise ValueError(f"no predictions with references for split '{split}' of '{dataset}'")
    row_of = {run: f"ASE-MLLM ({run})", untrained: UNTRAINED_ROW,
              **{n: f"ASE-MLLM ({n})" for n in to_generate if n not in (run, untrained)}}
    partial = _coverage({row_of[n]: caps for n, caps in generated.items()}, expected,
                        {row_of[n]: f for n, f in failed.items()}, split, allow_partial)
    notes += [f"{row}: scored on {cover} (--allow-partial)" for row, cover in partial.items()]

    candidates: dict[str, dict[str, str]] = {row_of[run]: ours}
    if untrained:
        candidates[UNTRAINED_ROW] = generated[untrained]
    if baselines:
        from stages.report.baselines import retrieval_baselines

        for name, caps in retrieval_baselines(dataset, split).items():
            candidates[name] = {i: caps[i] for i in ours if i in caps}
    truth = attribute_truth(dataset, split)
    if truth is not None and baselines:
        candidates[CONSTANT_ROW] = {i: truth.constant for i in ours}

    run_of_row = {row_of[run]: run, UNTRAINED_ROW: untrained}
    for cond, name in runs_by_condition.items():
        if name not in run_of_row.values():
            candidates[row_of[name]] = generated[name]
            run_of_row[row_of[name]] = name

    rows: dict[str, dict[str, Any]] = {}
    rescored: list[str] = []
    spice_notes: dict[str, str] = {}
    for row, caps in candidates.items():
        target = out / "metrics.json" if row == f"ASE-MLLM ({run})" else out / "baselines" / f"{_slug(row)}.json"
        result, fresh = score_to_file(target, caps, refs, spice_lib=spice_lib, progress=progress)
        rows[row] = {**result, **diversity(caps), **(attribute_scores(caps, truth.values) if truth else {})}
        spice_notes.update(result.get("notes", {}))
        if fresh:
            rescored.append(row)
    for row, cover in partial.items():
        rows[row]["partial"] = cover
    if truth is not None:  # forced choices: what each model finds likeliest to say (stages/report/forced_choice.py)
        from stages.report.forced_choice import forced_choice_scores, mask_following, run_choices
        from stages.synthetic.truth import ground_truth

        entries = ground_truth(dataset)
        for row, name in run_of_row.items():
            if name is not None and row in rows:
                ids, at = set(candidates[row]), checkpoint if name == run else None
                # a run without active IASC (no fusion, or zero gates) reads no map: the moved mask changes nothing
                sources = (None, "moved") if condition(dataset, name)[1] else (None,)
                choices, *moved = run_choices(dataset, name, manifest, split, ids, at, sources=sources)[0]
                forced = forced_choice_scores(choices, truth.values)
                following = mask_following(moved[0] if moved else choices, choices, entries)
                rows[row].update(forced_choice=forced["accuracy"], global_forced_choice=forced["global_accuracy"],
                                 mask_following=following["rate"], mask_following_baseline=following["baseline"])
        if CONSTANT_ROW in rows:
            forced = forced_choice_scores({i: truth.majority for i in candidates[CONSTANT_ROW]}, truth.values)
            rows[CONSTANT_ROW].update(forced_choice=forced["accuracy"], global_forced_choice=forced["global_accuracy"])
    write_json_atomic(out / "rows.json", {row: {k: v for k, v in m.items() if k not in ("notes", "fingerprint")}
                                          for row, m in rows.items()})

    table_rows = {r: m for r, m in rows.items() if run_of_row.get(r) in (None, run, untrained)}
    row_of_run = {n: r for r, n in run_of_row.items()}
    ablation_rows = {c: rows[row_of_run[n]] for c, n in runs_by_condition.items()}
    base_family = families.of_run(run_config(runs_dir(dataset) / run))  # its table: II (InternVL), III (Qwen2.5-VL)
    tables = write_tables(out, dataset, table_rows, ablation_rows, spice_notes, paper_table=base_family.paper_table,
                          base=None if base_family is families.DEFAULT else base_family.label, partial=partial)
    if truth is not None:
        first_reference = {i: refs[i][0] for i in ours}
        reference_row = {**attribute_scores(first_reference, truth.values), **diversity(first_reference)}
        markdown = write_attribute_table(out, dataset, {**rows, REFERENCE_ROW: reference_row}, split)
        tables = {markdown.splitlines()[0][4:]: markdown, **tables}
    study = study_dir(dataset)
    if (study / "study.md").exists():  # the ablation study by ground truth (`ase-mllm study`), with its plot
        markdown = (study / "study.md").read_text()
        if (study / "study.png").exists():
            write_bytes_atomic(out / "images" / "study.png", (study / "study.png").read_bytes())
            markdown += "\n![Ablation study: mean and sd over seeds per variant](images/study.png)\n"
        tables[markdown.splitlines()[0][4:]] = markdown
    probe = None
    if condition(dataset, run)[1]:  # trained with IASC: does it follow where its map points? (stages/report/probe.py)
        from stages.report.probe import probe_saliency

        try:
            p = probe_saliency(dataset, run, manifest, split, limit or 48, checkpoint=checkpoint,
                               batch_size=batch_size, decode=decode, progress=progress)
        except ValueError as e:  # e.g. a split of one image: no other image's map to move
            notes.append(f"saliency probe skipped: {e}")
        else:
            probe, markdown = p.line(), p.markdown()
            tables[markdown.splitlines()[0][4:]] = markdown
    _write_predictions(out / "predictions.parquet", ours, candidates, refs)
    index = _gallery(out, dataset, run, manifest, ours, refs, tables, gallery)
    return ReportSummary(out, rows, rescored, tables, index, notes, time.perf_counter() - start, probe)


def _coverage(predictions: dict[str, dict[str, str]], expected: list[str], failed: dict[str, list[tuple[str, str]]],
              split: str, allow_partial: bool) -> dict[str, str]:
    """{row: "N of M images"} for the rows missing predictions of ``expected`` images; without ``allow_partial``
    the first such row is refused with the reason of one of its images."""
    partial = {}
    for row, caps in predictions.items():
        missing = [i for i in expected if i not in caps]
        if not missing:
            continue
        if not allow_partial:
            reasons = dict(failed.get(row, []))
            example = f"{missing[0]}: {reasons.get(missing[0], 'no prediction')}"
            raise ValueError(f"{row}: {len(missing)} of {len(expected)} {split} images have no prediction (e.g. "
                             f"{example}); fix and rerun to generate them, or pass --allow-partial to score the rest")
        partial[row] = f"{len(expected) - len(missing)} of {len(expected)} images"
    return partial


def _write_predictions(path: Path, ours: dict[str, str], candidates: dict[str, dict[str, str]],
                       refs: dict[str, list[str]]) -> None:
    """One row per image: our critique, every other row's caption, the references."""
    ids = sorted(ours)
    columns: dict[str, Any] = {"image_id": ids, "caption": [ours[i] for i in ids]}
    for row, caps in candidates.items():
        if caps is not ours:
            columns[row] = [caps.get(i) for i in ids]
    columns["references"] = [refs[i] for i in ids]
    write_parquet_atomic(path, pa.table(columns))


def _gallery(out: Path, dataset: str, run: str, manifest: Manifest | None, ours: dict[str, str],
             refs: dict[str, list[str]], tables: dict[str, str], limit: int) -> Path:
    """index.html: the tables and the first ``limit`` images (by id) with overlay, critique, references, score."""
    from stages.report.html import GalleryItem, render_report
    from stages.report.metrics import per_image_path
    from stages.saliency.overlay import overlay
    from storage.atomic import atomic_path
    from storage.images import ImageError, open_rgb, safe_join
    from storage.tables import image_root, read_table

    from storage.saliency_store import find_store

    store, _ = find_store(manifest)
    per_image = {}
    side = per_image_path(out / "metrics.json")
    if side.exists():
        for line in side.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                per_image[str(row.pop("image_id"))] = row
    root = image_root(dataset)
    meta = {r["image_id"]: r for r in read_table(dataset, "images").to_pylist() if r["image_id"] in ours}
    items = []
    for image_id in sorted(ours)[:limit]:
        row = meta[image_id]
        path = safe_join(root, row["path"])
        overlay_path, score = None, None
        if store is not None and store.has(row["sha256"]):
            sal, _category, score = store.read(row["sha256"])
            overlay_path = out / "overlays" / f"{row['sha256'][:16]}.png"
            if not overlay_path.exists():
                try:
                    with atomic_path(overlay_path) as tmp:
                        overlay(open_rgb(path), sal).save(tmp, format="PNG")
                except ImageError:
                    overlay_path = None
        items.append(GalleryItem(path, overlay_path, ours[image_id], refs[image_id], score,
                                 per_image.get(image_id), image_id))
    return render_report(out, f"ASE-MLLM report: {dataset} / {run}", tables, items)
