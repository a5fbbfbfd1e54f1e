"""``ase-mllm ingest``: convert datasets named in the manifest to the canonical tables."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def ingest(
        datasets: list[str] = typer.Argument(None, help="Dataset names from the manifest."),
        all_datasets: bool = typer.Option(False, "--all", help="Ingest every dataset in the manifest."),
        force: bool = typer.Option(False, "--force", help="Recompute even when the inputs are unchanged."),
        workers: int = typer.Option(4, "--workers", min=1, help="Threads decoding images."),
    ) -> None:
        """Convert official release files (or a photo folder) to images / comments / quarantine tables."""
        from pipeline.context import manifest
        from stages.ingest.run import IngestError, ingest_dataset

        m = manifest()
        names = sorted(m.datasets) if all_datasets else list(datasets or [])
        if not names:
            raise typer.BadParameter("name at least one dataset, or pass --all")
        specs = [m.dataset(n) for n in names]  # unknown names fail before any work
        failed = []
        for spec in specs:
            try:
                ingest_dataset(spec, force=force, workers=workers, echo=typer.echo)
            except IngestError as e:
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
                failed.append(spec.name)
        if failed:
            raise typer.Exit(1)
