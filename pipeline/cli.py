"""The ``ase-mllm`` command line: global options, then each stage's commands."""
from __future__ import annotations

from pathlib import Path

import typer

from pipeline import context
from pipeline.manifest import ManifestError

app = typer.Typer(
    help="ASE-MLLM: aesthetic saliency maps, saliency-guided MLLM fine-tuning, critique generation and scoring.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main(
    manifest: Path = typer.Option(
        Path("data_manifest.yaml"), "--manifest", help="Dataset and model manifest.", envvar="ASE_MANIFEST"
    ),
) -> None:
    """Artefacts go under $ASE_WORK (default work/)."""
    context.set_manifest_path(manifest)


def _register_stages() -> None:
    from pipeline import status
    from stages.ingest import commands as ingest

    for module in (status, ingest):
        module.register(app)
    for optional in ("stages.saliency.commands", "stages.finetune.commands", "stages.report.commands"):
        try:
            module = __import__(optional, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != optional:
                raise
            continue
        module.register(app)


_register_stages()


def run() -> None:
    """Console entry point: manifest problems become one clear line, not a traceback."""
    try:
        app()
    except ManifestError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
