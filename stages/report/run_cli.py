"""CLI: ``ase-mllm generate``, ``report``, ``caption`` and ``serve`` (heavy imports inside)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import fail
from pipeline.paths import runs_dir

_CHECKPOINT = typer.Option(None, "--checkpoint", help="checkpoint-N / final / a path (default: final, else newest).")
_BATCH = typer.Option(8, "--batch-size", help="Images per generate() call.")
_MAX_NEW = typer.Option(64, "--max-new-tokens")
_BEAMS = typer.Option(1, "--num-beams", help="Beam search with this many beams (1: greedy).")
_SAMPLE = typer.Option(False, "--do-sample", help="Nucleus sampling instead of greedy / beam search.")
_TEMP = typer.Option(1.0, "--temperature")
_TOP_P = typer.Option(1.0, "--top-p")
_SEED = typer.Option(0, "--seed", help="Sampling seed.")
_NO_REPEAT = typer.Option(0, "--no-repeat-ngram", help="Never repeat an n-gram of this size (0: off).")


def _decode(max_new_tokens: int, num_beams: int, do_sample: bool, temperature: float, top_p: float, seed: int,
            no_repeat: int):  # noqa: ANN202
    from stages.report.generate import DecodeConfig

    return DecodeConfig(max_new_tokens, num_beams, do_sample, temperature, top_p, seed, no_repeat)


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        dataset: str = typer.Option(..., "--dataset", help="Ingested dataset."),
        run: str = typer.Option("default", "--run-name", "--run",
                                 help="Run under runs/<dataset>/ ('untrained': the base); under torchrun spell "
                                      "it --run-name."),
        split: str = typer.Option("test", "--split"),
        checkpoint: Optional[str] = _CHECKPOINT,
        batch_size: int = _BATCH,
        part_size: int = typer.Option(64, "--part-size", help="Predictions per committed part file."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images of the split (by id)."),
        allow_missing_saliency: Optional[bool] = typer.Option(
            None, "--allow-missing-saliency/--require-saliency", help="Uniform map for images without one (default: as trained)."),
        max_new_tokens: int = _MAX_NEW, num_beams: int = _BEAMS, do_sample: bool = _SAMPLE,
        temperature: float = _TEMP, top_p: float = _TOP_P, seed: int = _SEED, no_repeat: int = _NO_REPEAT,
    ) -> None:
        """Critiques for every image of a split without one yet (resumable; torchrun ranks share the work)."""
        from pipeline.context import manifest
        from stages.report.generate import generate_split

        try:
            s = generate_split(dataset, run, manifest(), split, checkpoint,
                               _decode(max_new_tokens, num_beams, do_sample, temperature, top_p, seed, no_repeat),
                               batch_size, part_size, limit, allow_missing_saliency)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        typer.echo(s.line())

    @app.command()
    def report(
        dataset: str = typer.Option("demo", "--dataset", help="Ingested dataset."),
        run: str = typer.Option("default", "--run-name", "--run",
                                 help="Run under runs/<dataset>/ (under torchrun spell it --run-name)."),
        split: str = typer.Option("test", "--split"),
        checkpoint: Optional[str] = _CHECKPOINT,
        batch_size: int = _BATCH,
        limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images of the split (by id)."),
        spice_lib: Optional[Path] = typer.Option(None, "--spice-lib", envvar="ASE_SPICE_LIB",
                                                 help="Directory with the CoreNLP 3.6.0 jars (enables SPICE)."),
        baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Untrained and retrieval rows."),
        ablation: bool = typer.Option(True, "--ablation/--no-ablation", help="Table II from the dataset's runs."),
        gallery: int = typer.Option(60, "--gallery", help="Images in the index.html gallery."),
        allow_partial: bool = typer.Option(False, "--allow-partial",
                                           help="Score a split with images lacking a prediction (the tables say so)."),
        max_new_tokens: int = _MAX_NEW, num_beams: int = _BEAMS, do_sample: bool = _SAMPLE,
        temperature: float = _TEMP, top_p: float = _TOP_P, seed: int = _SEED, no_repeat: int = _NO_REPEAT,
    ) -> None:
        """Generate (if needed), score against the baselines and write reports/<dataset>/<run>/ (under torchrun
        the ranks share generation and rank 0 scores)."""
        from pipeline.context import manifest
        from stages.report.build import build_report
        from stages.report.metrics import JavaNotFoundError

        try:
            s = build_report(dataset, run, manifest(), split, checkpoint,
                             _decode(max_new_tokens, num_beams, do_sample, temperature, top_p, seed, no_repeat),
                             batch_size, limit, spice_lib, baselines, ablation, gallery, allow_partial=allow_partial)
        except (FileNotFoundError, ValueError, JavaNotFoundError) as e:
            fail(str(e))
        if s is None:
            typer.echo(f"report: rank {os.environ.get('RANK')} generated its share; rank 0 scores the split")
            return
        for markdown in s.tables.values():
            typer.echo(markdown)
        for note in s.notes:
            typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
        typer.echo(s.line())
        typer.echo(f"open {s.index}")

    @app.command()
    def caption(
        paths: list[Path] = typer.Argument(..., help="Image files and / or folders (searched recursively)."),
        run: Optional[str] = typer.Option(None, "--run-name", "--run", help="DATASET/RUN or RUN (default: the newest trained run)."),
        out: Path = typer.Option(Path("captions"), "--out", help="Output folder."),
        checkpoint: Optional[str] = _CHECKPOINT,
        batch_size: int = typer.Option(4, "--batch-size"),
        max_new_tokens: int = _MAX_NEW, num_beams: int = _BEAMS, do_sample: bool = _SAMPLE,
        temperature: float = _TEMP, top_p: float = _TOP_P, seed: int = _SEED, no_repeat: int = _NO_REPEAT,
    ) -> None:
        """Critique your own photos: captions.jsonl / .csv, heatmaps and an index.html gallery."""
        from pipeline.context import manifest
        from stages.report.caption import caption_files

        try:
            s = caption_files(paths, manifest(), out, run, checkpoint,
                              _decode(max_new_tokens, num_beams, do_sample, temperature, top_p, seed, no_repeat), batch_size)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        for row in s.rows:
            if row.error:
                typer.secho(f"error: {row.path}: {row.error}", fg=typer.colors.RED, err=True)
        typer.echo(s.line())

    @app.command()
    def serve(
        run: Optional[str] = typer.Option(None, "--run-name", "--run",
                                          help="RUN or DATASET/RUN (default: the demo's IASC run, demo/demo-ias)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="The run's dataset (default: demo)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every network the "
                                                             "machine is on; the app has no login)."),
        port: int = typer.Option(7860, "--port", help="Port to listen on."),
        checkpoint: Optional[str] = _CHECKPOINT,
        max_new_tokens: int = _MAX_NEW, num_beams: int = _BEAMS, do_sample: bool = _SAMPLE,
        temperature: float = _TEMP, top_p: float = _TOP_P, seed: int = _SEED, no_repeat: int = _NO_REPEAT,
    ) -> None:
        """A local web app: drop photos, see each one's EAT score, saliency overlay and critique, and change the map."""
        from pipeline.context import manifest
        from stages.report.caption import resolve_run
        from stages.report.critique import Critic, EatSaliency
        from stages.report.serve import require_port, sibling_run
        from stages.report.serve import serve as serve_app

        decode = _decode(max_new_tokens, num_beams, do_sample, temperature, top_p, seed, no_repeat)
        require_port(host, port)
        try:
            if run is None:
                ds, name = dataset or "demo", "demo-ias"
                if not (runs_dir(ds) / name).is_dir():
                    fail(f"no run {ds}/{name} under {runs_dir(ds).parent}: " + ("run `make demo` first, or name a "
                         "run with --run-name" if ds == "demo" else "name a run with --run-name"))
            else:
                ds, name = resolve_run(f"{dataset}/{run}" if dataset and "/" not in run else run)
            saliency = EatSaliency(manifest())
            critic = Critic.load(saliency, ds, name, checkpoint, decode)
            other = sibling_run(ds, name)
            sibling = Critic.load(saliency, ds, other, None, decode) if other else None
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        serve_app(critic, sibling, host, port, typer.echo)
