"""The ``ase-mllm`` command line: global options, then each stage's commands."""
from __future__ import annotations

import os
from pathlib import Path

import typer

from pipeline import context
from pipeline.errors import PipelineError

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
    from pipeline import bench, demo, status, study
    from stages.finetune import commands as finetune
    from stages.ingest import commands as ingest
    from stages.pretrain import commands as pretrain
    from stages.report import run_cli as report_runs
    from stages.report import score_cli
    from stages.saliency import commands as saliency

    for module in (status, ingest, saliency, finetune, report_runs, score_cli, demo, study, pretrain, bench):
        module.register(app)


_register_stages()


def _quiet_third_party_output() -> None:
    """One progress bar per stage is ours: the Hub's / transformers' own bars (shard writing, weight loading)
    are switched off. On a machine without GPU device nodes, DeepSpeed (imported by the Trainer) is told so up
    front: its auto-detection otherwise prints a warning in every training command."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not any(Path(node).exists() for node in ("/dev/nvidiactl", "/dev/kfd")):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def run() -> None:
    """Console entry point: problems the user can fix become one clear line, not a traceback."""
    _quiet_third_party_output()
    try:
        app()
    except (PipelineError, FileNotFoundError) as e:
        if os.environ.get("ASE_DEBUG"):
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
