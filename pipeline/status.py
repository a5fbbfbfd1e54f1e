"""``ase-mllm status``: per dataset and stage, done / stale / missing, with counts."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer

from pipeline import context
from pipeline.manifest import DatasetSpec, Manifest
from pipeline.paths import dataset_dir, reports_dir, runs_dir


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str  # "done" | "stale" | "missing"
    detail: str


def ingest_status(spec: DatasetSpec) -> StageStatus:
    meta_path = dataset_dir(spec.name) / "meta.json"
    if not meta_path.exists():
        root = "" if spec.root.is_dir() else f" (root {spec.root} not found)"
        return StageStatus("ingest", "missing", f"not ingested{root}")
    meta = json.loads(meta_path.read_text())
    c = meta["counts"]
    detail = f"{c['images']:,} images, {c['comments']:,} comments, {c['quarantined']:,} quarantined"
    if spec.root.is_dir():
        from stages.ingest.formats import converter
        from stages.ingest.run import input_fingerprint

        if input_fingerprint(spec, converter(spec.format)) != meta.get("fingerprint"):
            return StageStatus("ingest", "stale", detail + "; inputs changed since")
    return StageStatus("ingest", "done", detail)


def saliency_status(manifest: Manifest, spec: DatasetSpec) -> StageStatus:
    from storage.saliency_store import current_store
    from storage.tables import read_table

    if not (dataset_dir(spec.name) / "images.parquet").exists():
        return StageStatus("saliency", "missing", "ingest first")
    try:
        store = current_store(manifest)
    except FileNotFoundError as e:
        return StageStatus("saliency", "missing", str(e).split(":")[-1].strip())
    shas = read_table(spec.name, "images").column("sha256").to_pylist()
    have = sum(store.has(sha) for sha in set(shas))
    total = len(set(shas))
    state = "done" if have == total else ("stale" if have else "missing")
    return StageStatus("saliency", state, f"{have:,}/{total:,} images mapped ({store.fingerprint})")


def _listing(stage: str, directory: Path, marker: str) -> StageStatus:
    names = sorted(p.parent.name for p in directory.glob(f"*/{marker}")) if directory.is_dir() else []
    if not names:
        return StageStatus(stage, "missing", "none")
    return StageStatus(stage, "done", f"{len(names)}: {', '.join(names)}")


def dataset_status(manifest: Manifest, spec: DatasetSpec) -> list[StageStatus]:
    return [
        ingest_status(spec),
        saliency_status(manifest, spec),
        _listing("finetune", runs_dir(spec.name), "run_config.json"),
        _listing("report", reports_dir(spec.name), "metrics.json"),
    ]


def register(app: typer.Typer) -> None:
    @app.command()
    def status() -> None:
        """Show, per dataset and stage, what is done, stale or missing."""
        manifest = context.manifest()
        colours = {"done": typer.colors.GREEN, "stale": typer.colors.YELLOW, "missing": typer.colors.BRIGHT_BLACK}
        for spec in manifest.datasets.values():
            typer.echo(f"{spec.name} ({spec.format})")
            for s in dataset_status(manifest, spec):
                typer.echo(f"  {s.stage:<9} " + typer.style(f"{s.state:<8}", fg=colours[s.state]) + f" {s.detail}")
