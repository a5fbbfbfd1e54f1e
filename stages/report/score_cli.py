"""The ``score`` command: metrics of any candidates / references pair (JSONL files), no run needed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import fail


def read_jsonl(path: Path, field: str) -> dict[str, object]:
    """``{"image_id", field}`` rows -> {image_id (as str): row[field]}; errors name the file and line."""
    rows: dict[str, object] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[str(row["image_id"])] = row[field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise typer.BadParameter(f"{path}:{n}: expected a JSON object with image_id and {field} ({e})")
    return rows


def register(app: typer.Typer) -> None:
    @app.command()
    def score(
        candidates: Path = typer.Option(..., exists=True, dir_okay=False, help='JSONL rows {"image_id", "caption"}.'),
        references: Path = typer.Option(..., exists=True, dir_okay=False, help='JSONL rows {"image_id", "captions": [...]}.'),
        out: Path = typer.Option(Path("metrics.json"), help="Corpus metrics JSON; per-image scores go beside it."),
        spice_lib: Path = typer.Option(
            None, envvar="ASE_SPICE_LIB", help="Directory with the Stanford CoreNLP 3.6.0 jars (enables SPICE)."
        ),
        force: bool = typer.Option(False, help="Rescore even if OUT already holds these inputs' scores."),
    ) -> None:
        """BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE, SPICE-L, Precision, Recall of candidates vs references."""
        from stages.report.metrics import METRIC_KEYS, JavaNotFoundError, per_image_path, score_to_file

        cands = {i: str(c) for i, c in read_jsonl(candidates, "caption").items()}
        refs = {i: [str(r) for r in rs] for i, rs in read_jsonl(references, "captions").items()}
        try:
            result, rescored = score_to_file(out, cands, refs, spice_lib=spice_lib, force=force)
        except (JavaNotFoundError, ValueError) as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        for key in sorted(set(result["notes"].values())):
            typer.secho(f"note: {key}", fg=typer.colors.YELLOW, err=True)
        summary = " ".join(f"{k}={'—' if result[k] is None else f'{result[k]:.3f}'}" for k in METRIC_KEYS)
        state = "scored" if rescored else "unchanged, not rescored"
        typer.echo(f"{result['n_images']} images {state}: {summary} -> {out} (+ {per_image_path(out).name})")

    @app.command("probe-saliency")
    def probe_saliency(
        run: str = typer.Option(..., "--run-name", "--run", help="A run under runs/<dataset>/ trained with IASC."),
        dataset: str = typer.Option("demo", "--dataset", help="Ingested dataset."),
        split: str = typer.Option("test", "--split"),
        sample: int = typer.Option(48, "--sample", help="Images of the split to probe (seeded sample)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the sample."),
        checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="checkpoint-N / final / a path."),
        batch_size: int = typer.Option(8, "--batch-size", help="Images per generate() call."),
    ) -> None:
        """Regenerate a sample with its own maps, another image's maps and uniform maps: what changes?"""
        from pipeline.context import manifest
        from stages.report.probe import probe_saliency as probe

        try:
            s = probe(dataset, run, manifest(), split, sample, seed, checkpoint, batch_size)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        typer.echo(s.markdown())
        typer.echo(s.line())
